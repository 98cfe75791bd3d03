/* cxlfork-restorer: ghost mode, a pre-spawned restorer waiting on its unix socket for one
 * restore (the clone's fd table, cwd, umask, session mode), see cxlfork/ghosts.py. */
#include "restorer.h"

/* Ghost mode: wait for one restore on socket sock, lay out the fd table it carries; returns
 * the plan fd. Message: u64 magic, nfd, umask, session mode (1 setsid, 2 setpgid), plan fd,
 * error-pipe index, cwd length, namespaces (low 32 bits: 1 + the index of an fd of the
 * clone's own network namespace among the nfd fds, high 32 bits: the same for its mount
 * namespace; the ghost setns()es into each and closes it; 0: stay in the one it was spawned
 * in); then nfd int32 destination numbers, then the cwd; the
 * nfd fds in SCM_RIGHTS, in the same order. Fails with exit statuses 126/127 before the
 * error pipe is in place. */
static char ghost_buf[8192] __attribute__((aligned(8)));
static uint64_t ghost_cmsg[(16 + GHOST_MAXFD * 4 + 7) / 8 + 1];

long cx_ghost_wait(long sock)
{
    uint64_t iov[2] = { (uint64_t)ghost_buf, sizeof ghost_buf };
    struct {
        uint64_t name;
        uint32_t namelen, pad;
        uint64_t iov, iovlen, control, controllen;
        int32_t flags, pad2;
    } mh = { 0, 0, 0, (uint64_t)iov, 1, (uint64_t)ghost_cmsg, sizeof ghost_cmsg, 0, 0 };
    long n;
    do
        n = sc(NR_recvmsg, sock, &mh, 0x40000000 /* MSG_CMSG_CLOEXEC */);
    while (n == -4 /* EINTR */);
    if (n <= 0)                                /* EOF: the pool is closed or its owner gone */
        sc(NR_exit_group, 0, 0, 0);
    const uint64_t *h = (const uint64_t *)ghost_buf;
    uint64_t nfd = h[1];
    const uint32_t *c = (const uint32_t *)ghost_cmsg;   /* len (u64), level, type, fds */
    if (n < 64 || n >= (long)sizeof ghost_buf || h[0] != GHOST_MAGIC || nfd > GHOST_MAXFD ||
        (mh.flags & 0x28 /* MSG_CTRUNC, MSG_TRUNC */) ||
        mh.controllen < 16 || c[2] != 1 || c[3] != 1 ||
        ghost_cmsg[0] != 16 + nfd * 4 || h[6] >= sizeof ghost_buf ||
        (uint64_t)n < 64 + nfd * 4 + h[6])
        sc(NR_exit_group, 126, 0, 0);
    const int32_t *dst = (const int32_t *)(ghost_buf + 64);
    const int32_t *got = (const int32_t *)(c + 4);
    char *cwd = ghost_buf + 64 + nfd * 4;
    int32_t tmp[GHOST_MAXFD];
    long base = sock + 1, r;
    for (uint64_t i = 0; i < nfd; i++)
        if (dst[i] >= base)
            base = dst[i] + 1;
    /* out of the way of every destination, then into place (as cx_spawn's child does) */
    for (uint64_t i = 0; i < nfd; i++) {
        r = sc(NR_fcntl, got[i], 0 /* F_DUPFD */, base);
        if (r < 0)
            sc(NR_exit_group, 127, 0, 0);
        sc(NR_close, got[i], 0, 0);
        tmp[i] = (int32_t)r;
    }
    sc(NR_close, sock, 0, 0);
    for (uint64_t i = 0; i < nfd; i++)
        if (sc(NR_dup2, tmp[i], dst[i], 0) < 0)
            sc(NR_exit_group, 127, 0, 0);
    sc6(NR_close_range, base, ~0U, 0, 0, 0, 0);
    if (h[5] < nfd)
        errfd = dst[h[5]];
    uint64_t net = h[7] & 0xffffffffu, mnt = h[7] >> 32;
    if (net && net <= nfd) {
        if ((r = sc(NR_setns, dst[net - 1], 0x40000000 /* CLONE_NEWNET */, 0)) < 0)
            fail("setns into the clone's network namespace", -1, 0, r);
        sc(NR_close, dst[net - 1], 0, 0);
    }
    if (mnt && mnt <= nfd) {                   /* before the chdir: setns moves to its root */
        if ((r = sc(NR_setns, dst[mnt - 1], 0x20000 /* CLONE_NEWNS */, 0)) < 0)
            fail("setns into the clone's mount namespace", -1, 0, r);
        sc(NR_close, dst[mnt - 1], 0, 0);
    }
    if (h[6]) {
        cwd[h[6]] = 0;
        if ((r = sc(NR_chdir, cwd, 0, 0)) < 0)
            fail("chdir to the checkpointed cwd", -1, 0, r);
    }
    sc(NR_umask, h[2], 0, 0);
    if (h[3] == 1 && (r = sc(NR_setsid, 0, 0, 0)) < 0)
        fail("setsid", -1, 0, r);
    if (h[3] == 2 && (r = sc(NR_setpgid, 0, 0, 0)) < 0)
        fail("setpgid", -1, 0, r);
    return (long)h[4];
}
