/* cxlfork-restorer: the static, libc-free program a clone starts as.
 *
 * It lives at 0x100000001000 (see restorer.ld), reads a binary restore plan from the fd named
 * in argv[1], and turns its own process into the checkpointed one:
 *   1. copies its own image to anonymous memory (so no file of it stays mapped and the exe
 *      link can be set to the checkpointed program), switches to its own stack;
 *   2. parks vvar/vdso in its region, unmaps everything outside the region, moves vvar/vdso to
 *      their checkpointed addresses;
 *   3. runs the plan's operations in order: mmap (store file MAP_PRIVATE, files, anonymous),
 *      pread (eager copies), mprotect, madvise, the userfaultfd of the anonymous runs mapped
 *      from the store (lazy moa, and the anonymous semantics of mow/hybrid), sigactions,
 *      sigaltstack, signal mask, rseq, tid address, robust list, prctl(PR_SET_MM_MAP), POSIX
 *      and interval timers, epoll interest entries, the signals pending at the checkpoint
 *      (queued to itself while every signal is blocked), closing its own fds, FD_CLOEXEC;
 *   4. creates the other threads (OP_THREAD: clone with CLONE_THREAD onto a stack in the
 *      region; each sets its own sigaltstack, rseq, tid address and robust list, then calls
 *      THREAD_PARK, which is never mapped: cxlfork, attached with PTRACE_O_TRACECLONE, keeps
 *      each thread at that SIGSEGV stop) and waits for a second go byte (all parked);
 *   5. once the threads are parked (after the go byte of step 6), takes the checkpointed
 *      process's credentials as its last change (OP_CREDS, restorer_creds.c; each thread
 *      took them for itself before parking);
 *   6. waits for cxlfork's go byte (cxlfork has PTRACE_SEIZEd it by then; EOF means cxlfork
 *      is gone, and it exits), closes its own fds, blocks every signal but SIGSEGV and unmaps
 *      its region; returning into the unmapped code faults, and at that SIGSEGV stop cxlfork
 *      installs the signal mask, xstate and registers and detaches with the signal dropped.
 *      (One ptrace stop in all: no exec stop, no SIGSTOP, no syscall stops.)
 * Any failure writes one line to the error fd and exits with status 1.
 *
 * Ghost mode (argv: restorer ghost FD): a pre-spawned "ghost" (cxlfork.ghosts) blocks in
 * recvmsg on the unix socket FD until cxlfork sends it one restore: the clone's fds
 * (SCM_RIGHTS) with their numbers, cwd, umask and session mode. It lays out its fd table as
 * the spawn path would, closes the socket and goes on at step 2 (with the plan fd from the
 * message). EOF on the socket (its owner closed the pool or died) makes it exit.
 *
 * Warm ghosts run a plan with OP_GHOSTWAIT (normal argv, spawned with the store, exe, file and
 * object fds): everything before that op (memory, signals, mm) runs at once; the op writes a
 * ready byte on its socket and waits there, as above, for the clone's own fds only. Until
 * then the error fd is a copy of that socket, so a failure line reaches the pool.
 */
#include "restorer.h"
#include <linux/ioctl.h>
#include <linux/userfaultfd.h>

extern char cx_image_start[], cx_image_end[];
char cx_stack[1 << 16] __attribute__((aligned(64)));

void *memcpy(void *d, const void *s, unsigned long n)
{
    char *dd = d;
    const char *ss = s;
    while (n--)
        *dd++ = *ss++;
    return d;
}

void *memset(void *d, int c, unsigned long n)
{
    char *dd = d;
    while (n--)
        *dd++ = (char)c;
    return d;
}

__asm__(".text\n.globl _start\n_start:\n"
        "  mov %rsp, %r12\n"
        "  and $-16, %rsp\n"
        "  call cx_selfcopy\n"
        "  lea cx_stack+65536(%rip), %rsp\n"
        "  mov %r12, %rdi\n"
        "  call cx_main\n"
        "  ud2\n");

/* Runs on the kernel-made stack and writes nothing in the image between copy and remap. */
__attribute__((used)) void cx_selfcopy(void)
{
    unsigned long lo = (unsigned long)cx_image_start & ~4095UL;
    unsigned long hi = ((unsigned long)cx_image_end + 4095) & ~4095UL;
    long t = sc6(NR_mmap, SELF_TMP, hi - lo, 7, 0x32 /* PRIVATE|FIXED|ANON */, -1, 0);
    if (t != (long)SELF_TMP)
        sc(NR_exit_group, 120, 0, 0);
    memcpy((void *)SELF_TMP, (void *)lo, hi - lo);
    long r = sc6(NR_mremap, SELF_TMP, hi - lo, hi - lo, 3 /* MAYMOVE|FIXED */, lo, 0);
    if (r != (long)lo)
        sc(NR_exit_group, 121, 0, 0);
}

int errfd = -1;

static char *put_str(char *p, const char *s)
{
    while (*s)
        *p++ = *s++;
    return p;
}

static char *put_hex(char *p, unsigned long v)
{
    char tmp[17];
    int n = 0;
    do {
        tmp[n++] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    p = put_str(p, "0x");
    while (n)
        *p++ = tmp[--n];
    return p;
}

static char *put_dec(char *p, long v)
{
    char tmp[21];
    int n = 0;
    if (v < 0) {
        *p++ = '-';
        v = -v;
    }
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

void fail(const char *what, long op, unsigned long addr, long err)
{
    char buf[200], *p = buf;
    p = put_str(p, "restorer: ");
    p = put_str(p, what);
    p = put_str(p, " (op ");
    p = put_dec(p, op);
    p = put_str(p, ", address ");
    p = put_hex(p, addr);
    p = put_str(p, "): errno ");
    p = put_dec(p, -err);
    *p++ = '\n';
    if (errfd >= 0)
        sc(NR_write, errfd, buf, p - buf);
    sc(NR_exit_group, 1, 0, 0);
    __builtin_unreachable();
}

static const char *const op_names[] = {
    "?", "mmap", "pread", "mprotect", "madvise", "rt_sigaction", "sigaltstack",
    "rt_sigprocmask", "rseq", "set_tid_address", "set_robust_list", "prctl(PR_SET_MM_MAP)",
    "close", "fcntl(FD_CLOEXEC)", "prctl", "prlimit64", "read of cxlfork's go byte",
    "userfaultfd (store-mapped anonymous memory)",
    "UFFDIO_REGISTER (store-mapped anonymous memory)", "sendmsg of the userfaultfd",
    "clone of a thread", "close_range", "wait of a warm ghost",
    "timer_create under the checkpointed ID (PR_TIMER_CREATE_RESTORE_IDS needs Linux 6.17+)",
    "timer_settime", "setitimer", "epoll_ctl(EPOLL_CTL_ADD) of a checkpointed interest entry "
    "(address: the target fd)",
    "rt_sigqueueinfo of a signal pending at the checkpoint",
    "epoll_ctl(EPOLL_CTL_ADD) of a fired one-shot interest entry (address: the target fd)",
    "mlock2 of a mapping locked at the checkpoint (RLIMIT_MEMLOCK too small?)",
    "mlockall(MCL_FUTURE) as at the checkpoint",
    "the checkpointed process's credentials",
};

static long uffd = -1;

/* lazy moa: hand the userfaultfd to cxlfork over the unix socket sock (SCM_RIGHTS) */
static long send_uffd(long sock)
{
    char byte = 'u';
    uint64_t iov[2] = { (uint64_t)&byte, 1 };
    uint32_t cmsg[6] = { 20, 0, 1 /* SOL_SOCKET */, 1 /* SCM_RIGHTS */, (uint32_t)uffd, 0 };
    struct {
        uint64_t name;
        uint32_t namelen, pad;
        uint64_t iov, iovlen, control, controllen;
        int32_t flags, pad2;
    } mh = { 0, 0, 0, (uint64_t)iov, 1, (uint64_t)cmsg, 24, 0, 0 };
    long r = sc(NR_sendmsg, sock, &mh, 0x4000 /* MSG_NOSIGNAL */);
    sc(NR_close, uffd, 0, 0);
    uffd = -1;
    return r < 0 ? r : 0;
}

static long run_op(const uint64_t *o)
{
    long r;
    switch (o[0]) {
    case OP_MMAP:
        r = sc6(NR_mmap, o[1], o[2], o[3], o[4] | 0x10 /* MAP_FIXED */, (long)o[5], o[6]);
        return r == (long)o[1] ? 0 : (r < 0 ? r : -17);
    case OP_PREAD: {
        uint64_t done = 0;
        while (done < o[3]) {
            r = sc6(NR_pread64, o[1], o[2] + done, o[3] - done, o[4] + done, 0, 0);
            if (r < 0)
                return r;
            if (r == 0)
                return -5;   /* EIO: store file shorter than the plan says */
            done += r;
        }
        return 0;
    }
    case OP_MPROTECT:
        return sc(NR_mprotect, o[1], o[2], o[3]);
    case OP_MADVISE:
        return sc(NR_madvise, o[1], o[2], o[3]);
    case OP_SIGACTION: {
        uint64_t act[4] = { o[2], o[3], o[4], o[5] };
        return sc6(NR_rt_sigaction, o[1], (long)act, 0, 8, 0, 0);
    }
    case OP_SIGALTSTACK: {
        uint64_t ss[3] = { o[1], o[2], o[3] };
        return sc(NR_sigaltstack, ss, 0, 0);
    }
    case OP_SIGMASK: {
        uint64_t m = o[1];
        return sc6(NR_rt_sigprocmask, 2 /* SIG_SETMASK */, (long)&m, 0, 8, 0, 0);
    }
    case OP_RSEQ:
        return sc6(NR_rseq, o[1], o[2], 0, o[3], 0, 0);
    case OP_TIDADDR:
        sc(NR_set_tid_address, o[1], 0, 0);
        return 0;
    case OP_ROBUST:
        return sc(NR_set_robust_list, o[1], o[2], 0);
    case OP_MM_MAP:
        return sc6(NR_prctl, 35 /* PR_SET_MM */, 14 /* PR_SET_MM_MAP */, o[1], o[2], 0, 0);
    case OP_CLOSE:
        return sc(NR_close, o[1], 0, 0);
    case OP_CLOSEFROM:
        return sc(NR_close_range, o[1], ~0U, 0);
    case OP_GHOSTWAIT: {
        /* a warm ghost: tell the pool it is ready, then wait for the clone's fds */
        char c = 'r';
        if ((r = sc(NR_write, o[1], &c, 1)) != 1)
            return r < 0 ? r : -5;
        cx_ghost_wait((long)o[1]);
        return 0;
    }
    case OP_TIMER_CREATE: {
        /* o: id, clock, notify, signo, value, at the main thread (SIGEV_THREAD_ID) */
        struct { uint64_t value; int32_t signo, notify, tid, pad[11]; } ev = { 0 };
        int32_t id = (int32_t)o[1];
        ev.value = o[5];
        ev.signo = (int32_t)o[4];
        ev.notify = (int32_t)o[3];
        if (o[6])
            ev.tid = (int32_t)sc(NR_getpid, 0, 0, 0);
        if ((r = sc(NR_prctl, PR_TIMER_CREATE_RESTORE_IDS, 1 /* ON */, 0)) < 0)
            return r;
        r = sc(NR_timer_create, o[2], &ev, &id);
        sc(NR_prctl, PR_TIMER_CREATE_RESTORE_IDS, 0 /* OFF */, 0);
        if (r < 0)
            return r;
        return id == (int32_t)o[1] ? 0 : -17;
    }
    case OP_TIMER_SET: {
        int64_t its[4] = { (int64_t)o[2], (int64_t)o[3], (int64_t)o[4], (int64_t)o[5] };
        return sc6(NR_timer_settime, o[1], 0, (long)its, 0, 0, 0);
    }
    case OP_SETITIMER: {
        int64_t itv[4] = { (int64_t)o[2], (int64_t)o[3], (int64_t)o[4], (int64_t)o[5] };
        return sc(NR_setitimer, o[1], itv, 0);
    }
    case OP_EPOLL_CTL: {
        /* o: target fd, epoll fd, events, data (the fd table is the clone's by now) */
        struct { uint32_t events; uint64_t data; } __attribute__((packed)) ev =
            { (uint32_t)o[3], o[4] };
        return sc6(NR_epoll_ctl, (long)o[2], 1 /* EPOLL_CTL_ADD */, (long)o[1], (long)&ev, 0, 0);
    }
    case OP_EPOLL_FIRED: {
        /* o: target fd, epoll fd, events, data of an EPOLLONESHOT entry that had fired and was
         * not re-armed (events: flags only). If the target is ready for anything now, add it
         * armed for everything and let it fire here (epoll_wait), which disables it as in the
         * original; else add it with its flags (the kernel arms EPOLLERR|EPOLLHUP). Run before
         * the epoll fd's other entries are added, so only such entries can be reported. */
        struct { int32_t fd; int16_t events, revents; } pf = { (int32_t)o[1], 0x27c7, 0 };
        uint32_t ev = (uint32_t)o[3];
        r = sc(NR_poll, &pf, 1, 0);
        if (r < 0)
            return r;
        if (pf.revents)
            ev |= 0x27c7;    /* IN|PRI|OUT|RDNORM|RDBAND|WRNORM|WRBAND|MSG|RDHUP */
        struct { uint32_t events; uint64_t data; } __attribute__((packed)) e = { ev, o[4] },
            got[8];
        r = sc6(NR_epoll_ctl, (long)o[2], 1 /* EPOLL_CTL_ADD */, (long)o[1], (long)&e, 0, 0);
        if (r < 0 || !pf.revents)
            return r;
        do
            r = sc6(NR_epoll_wait, (long)o[2], (long)got, 8, 0, 0, 0);
        while (r > 0);
        return r;
    }
    case OP_SIGQUEUE: {
        /* o: address of the siginfo in the plan, 1: to this (main) thread only */
        const int32_t *si = (const int32_t *)o[1];
        long me = sc(NR_getpid, 0, 0, 0);
        if (o[2])
            return sc6(NR_rt_tgsigqueueinfo, me, me, si[0], (long)si, 0, 0);
        return sc(NR_rt_sigqueueinfo, me, si[0], si);
    }
    case OP_MLOCK:                    /* o[3]: MLOCK_ONFAULT */
        return sc(NR_mlock2, o[1], o[2], o[3]);
    case OP_MLOCKALL:
        return sc(NR_mlockall, o[1], 0, 0);
    case OP_CREDS:                    /* the last op that changes us: restorer_creds.c */
        return cx_apply_creds((const uint64_t *)o[1], -1);
    case OP_CLOEXEC:
        return sc(NR_fcntl, o[1], 2 /* F_SETFD */, 1 /* FD_CLOEXEC */);
    case OP_PRCTL:
        return sc6(NR_prctl, o[1], o[2], o[3], o[4], o[5], 0);
    case OP_PRLIMIT: {
        uint64_t lim[2] = { o[2], o[3] };
        return sc6(NR_prlimit64, 0, o[1], (long)lim, 0, 0, 0);
    }
    case OP_WAITGO: {
        char c = 0;
        do
            r = sc(NR_read, o[1], &c, 1);
        while (r == -4 /* EINTR */);
        if (r < 0)
            return r;
        return r == 1 && c == 'g' ? 0 : -32;   /* EPIPE: cxlfork went away */
    }
    case OP_UFFD_OPEN: {
        r = sc(NR_userfaultfd, 02000000 | 04000 /* O_CLOEXEC | O_NONBLOCK */, 0, 0);
        if (r < 0)
            return r;
        uffd = r;
        /* o[1]: the features (plan.UFFD_FEATURES: minor faults on shmem, REMOVE, UNMAP,
         * REMAP and FORK events) */
        struct uffdio_api api = { .api = UFFD_API, .features = o[1] };
        return sc(NR_ioctl, uffd, UFFDIO_API, &api);
    }
    case OP_UFFD_REG: {
        struct uffdio_register reg = { .range = { o[1], o[2] },
                                       .mode = UFFDIO_REGISTER_MODE_MINOR };
        return sc(NR_ioctl, uffd, UFFDIO_REGISTER, &reg);
    }
    case OP_UFFD_SEND:
        return send_uffd((long)o[1]);
    case OP_THREAD: {
        const uint64_t *rec = (const uint64_t *)o[1];
        uint64_t stk = THREAD_STACKS + rec[9] * THREAD_STACK;
        if (stk + THREAD_STACK > THREAD_PARK)
            return -12;                            /* ENOMEM: too many threads */
        r = sc6(NR_mmap, stk, THREAD_STACK, 3, 0x32 /* PRIVATE|FIXED|ANON */, -1, 0);
        if (r != (long)stk)
            return r < 0 ? r : -17;
        uint64_t *top = (uint64_t *)(stk + THREAD_STACK);
        top[-2] = (uint64_t)rec;
        /* VM|FS|FILES|SIGHAND|THREAD|SYSVSEM; o[2]: its checkpointed tid, given back
         * (clone3 set_tid) when this process has its checkpointed PID o[3] (a new PID
         * namespace, or --same-pid), if that tid is free */
        long fl = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000;
        r = -1;
        if (o[2] && sc(NR_getpid, 0, 0, 0) == (long)o[3])
            r = cx_clone3_thread(fl, top - 2, (long)o[2]);
        if (r < 0)
            r = cx_clone_thread(fl, top - 2);
        return r < 0 ? r : 0;
    }
    }
    return -22;
}

__attribute__((used)) void cx_main(uint64_t *sp0)
{
    long argc = (long)sp0[0];
    char **argv = (char **)(sp0 + 1);
    uint64_t *p = (uint64_t *)(argv + argc + 1);
    while (*p)
        p++;                       /* skip envp */
    p++;
    unsigned long vdso_cur = 0;
    for (; p[0]; p += 2)
        if (p[0] == 33 /* AT_SYSINFO_EHDR */)
            vdso_cur = p[1];
    if (argc < 2)
        sc(NR_exit_group, 122, 0, 0);
    if (argv[1][0] == 'i')
        cx_init_main();            /* PID 1 of a clone's PID namespace: restorer_init.c */
    long planfd = 0;
    int ghost = argv[1][0] == 'g';
    const char *num = ghost ? (argc > 2 ? argv[2] : "x") : argv[1];
    for (const char *s = num; *s; s++) {
        if (*s < '0' || *s > '9')
            sc(NR_exit_group, 122, 0, 0);
        planfd = planfd * 10 + (*s - '0');
    }
    if (ghost)
        planfd = cx_ghost_wait(planfd);

    uint64_t st[18];               /* struct stat: st_size at word 6 */
    if (sc(NR_fstat, planfd, st, 0) < 0)
        sc(NR_exit_group, 123, 0, 0);
    unsigned long plen = (st[6] + 4095) & ~4095UL;
    if (sc6(NR_mmap, PLAN_ADDR, plen, 1, 0x12 /* PRIVATE|FIXED */, planfd, 0) != (long)PLAN_ADDR)
        sc(NR_exit_group, 124, 0, 0);
    const uint64_t *h = (const uint64_t *)PLAN_ADDR;
    if (h[0] != PLAN_MAGIC || h[1] != PLAN_VERSION)
        sc(NR_exit_group, 125, 0, 0);
    errfd = (int)h[14];
    uint64_t nops = h[2], nspecial = h[4], vdso_orig = h[5];
    const uint64_t *ops = (const uint64_t *)(PLAN_ADDR + h[3]);

    /* vvar/vdso: park in the region (their final spots may be taken by our old stack) */
    uint64_t lo_orig = vdso_orig;
    for (uint64_t i = 0; i < nspecial; i++)
        if (h[6 + 2 * i] < lo_orig)
            lo_orig = h[6 + 2 * i];
    if (nspecial && !vdso_cur)
        fail("no vDSO in the restorer", -1, 0, -2);
    for (uint64_t i = 0; i < nspecial; i++) {
        uint64_t a = h[6 + 2 * i], len = h[7 + 2 * i];
        long r = sc6(NR_mremap, vdso_cur + (a - vdso_orig), len, len, 3,
                     SPECIAL_TMP + (a - lo_orig), 0);
        if (r < 0)
            fail("mremap of vvar/vdso to the parking area", -1, a, r);
    }
    long r = sc(NR_munmap, 0, REGION_LO, 0);
    if (r < 0)
        fail("munmap below the region", -1, 0, r);
    r = sc(NR_munmap, REGION_HI, TASK_TOP - REGION_HI, 0);
    if (r < 0)
        fail("munmap above the region", -1, REGION_HI, r);
    for (uint64_t i = 0; i < nspecial; i++) {
        uint64_t a = h[6 + 2 * i], len = h[7 + 2 * i];
        r = sc6(NR_mremap, SPECIAL_TMP + (a - lo_orig), len, len, 3, a, 0);
        if (r != (long)a)
            fail("mremap of vvar/vdso to its checkpointed address", -1, a, r < 0 ? r : -17);
    }
    for (uint64_t i = 0; i < nops; i++) {
        const uint64_t *o = ops + 8 * i;
        r = run_op(o);
        if (r < 0)
            fail(o[0] < sizeof op_names / sizeof op_names[0] ? op_names[o[0]] : "?", (long)i,
                 o[1], r);
    }
    /* Hand over: only SIGSEGV unblocked (a fault on a blocked SIGSEGV would reset its action),
     * unmap the region we run from. Returning from munmap faults on the next instruction; the
     * tracer sees that SIGSEGV stop, installs the mask, xstate and registers, drops the signal
     * and detaches. Without a tracer the SIGSEGV kills us, which is right. */
    uint64_t mask = ~(1UL << 10);
    sc6(NR_rt_sigprocmask, 2 /* SIG_SETMASK */, (long)&mask, 0, 8, 0, 0);
    sc(NR_munmap, REGION_LO, REGION_HI - REGION_LO, 0);
    __builtin_unreachable();
}
