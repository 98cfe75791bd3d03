/* cxlfork C helpers: spawn of the restorer (vfork-style clone, or clone3 with set_tid or
 * CLONE_INTO_CGROUP) with its fd table laid out, and handing a restore to a ghost. */
#include "cx_internal.h"

struct cx_clone_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
             set_tid, set_tid_size, cgroup;
};

static void child_fail(int fd, const char *step, int err)
{
    char msg[128];
    int n = snprintf(msg, sizeof msg, "spawn: %s: errno %d\n", step, err);
    if (fd >= 0 && n > 0)
        (void)!write(fd, msg, n);
    _exit(127);
}

struct spawn_args {
    const char *path;
    char *const *argv;
    const int *src, *dst;
    int nfd, umask_, sidmode, errfd;
    const char *cwd;
    int cgfd, cgkind;
    int nkids;                       /* a process tree: the root's children (cx_spawn_tree) */
    const struct cx_kid *kids;
};

/* The child of cx_spawn, up to the exec of the restorer. With CLONE_VM|CLONE_VFORK it runs on
 * its own stack in the parent's memory (as posix_spawn does): it only makes syscalls and
 * writes to its own stack; every signal is blocked and every disposition is reset to the
 * default, so no handler of the parent runs here and nothing ignored leaks into the clone. */
static int spawn_child(void *arg)
{
    struct spawn_args *a = arg;
    int nfd = a->nfd;
    const int *src = a->src, *dst = a->dst;
    int efd = a->errfd >= 0 && a->errfd < nfd ? src[a->errfd] : -1;
    uint64_t dfl[4] = { 0, 0, 0, 0 };    /* kernel sigaction: SIG_DFL, no flags, no mask */
    /* join the cgroup (an open cgroup.procs: "0" is the writer) before anything is charged */
    if (a->cgkind == CX_CG_PROCS && write(a->cgfd, "0", 1) != 1)
        child_fail(efd, "join cgroup", errno);
    for (int s = 1; s < 65; s++)
        if (s != SIGKILL && s != SIGSTOP)
            syscall(SYS_rt_sigaction, s, dfl, NULL, 8);
    if (a->sidmode == 1 && setsid() < 0)
        child_fail(efd, "setsid", errno);
    if (a->sidmode == 2 && setpgid(0, 0) < 0)
        child_fail(efd, "setpgid", errno);
    /* a process of a tree forks its children first (plain clone3 forks under their
     * checkpointed PIDs in this PID namespace), each of which forks its own children the
     * same way (any depth), then lays out its own fds and execs its restorer */
    for (int k = 0; k < a->nkids; k++) {
        const struct cx_kid *kd = &a->kids[k];
        struct spawn_args ka = { a->path, kd->argv, kd->src, kd->dst, kd->nfd, kd->umask_,
                                 kd->sidmode, kd->errfd, kd->cwd, -1, CX_CG_NONE,
                                 kd->nkids, kd->kids };
        struct cx_clone_args ca;
        pid_t t = kd->set_tid;
        memset(&ca, 0, sizeof ca);
        ca.exit_signal = SIGCHLD;
        ca.set_tid = (uint64_t)(uintptr_t)&t;
        ca.set_tid_size = 1;
        long r = syscall(SYS_clone3, &ca, sizeof ca);
        if (r == 0 && kd->zombie >= 0) {       /* a zombie child: die as it did */
            int sig = kd->zombie & 0x7f;
            if (sig) {
                sigset_t one;
                sigemptyset(&one);
                sigaddset(&one, sig);
                signal(sig, SIG_DFL);
                syscall(SYS_kill, getpid(), sig);
                sigprocmask(SIG_UNBLOCK, &one, NULL);
            }
            syscall(SYS_exit_group, (kd->zombie >> 8) & 0xff);
        }
        if (r == 0)
            _exit(spawn_child(&ka));
        if (r < 0)
            child_fail(efd, "fork of a child of the tree", errno);
    }
    if (a->cwd && a->cwd[0] && chdir(a->cwd) < 0)
        child_fail(efd, "chdir", errno);
    umask(a->umask_);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    int base = 3;
    for (int i = 0; i < nfd; i++) {
        if (src[i] >= base) base = src[i] + 1;
        if (dst[i] >= base) base = dst[i] + 1;
    }
    int tmp[nfd > 0 ? nfd : 1];
    for (int i = 0; i < nfd; i++) {
        tmp[i] = fcntl(src[i], F_DUPFD, base);
        if (tmp[i] < 0)
            child_fail(efd, "dup fd", errno);
    }
    if (a->errfd >= 0 && a->errfd < nfd)
        efd = tmp[a->errfd];
    for (int i = 0; i < nfd; i++) {
        if (dup2(tmp[i], dst[i]) < 0)
            child_fail(efd, "dup2 fd", errno);
    }
    if (a->errfd >= 0 && a->errfd < nfd)
        efd = dst[a->errfd];
    /* close everything that is not a destination */
    int maxdst = -1;
    for (int i = 0; i < nfd; i++)
        if (dst[i] > maxdst) maxdst = dst[i];
    for (int fd = 0; fd <= maxdst; fd++) {
        int keep = 0;
        for (int i = 0; i < nfd && !keep; i++)
            keep = dst[i] == fd;
        if (!keep)
            close(fd);
    }
    syscall(SYS_close_range, maxdst + 1, ~0U, 0);
    char *envp[] = { NULL };
    /* the restorer starts with every signal blocked; its plan sets the checkpointed mask */
    syscall(SYS_execve, a->path, a->argv, envp);
    child_fail(efd, "execve restorer", errno);
    return 127;
}

#define SPAWN_STACK (256 << 10)
#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif

#ifdef __x86_64__
/* clone3 vfork-style (CLONE_VM|CLONE_VFORK): the child starts on the top of ca->stack and
 * calls fn(arg), then exits with its result; no libc wrapper does this for clone3. */
static long clone3_call(struct cx_clone_args *ca, int (*fn)(void *), void *arg)
{
    long ret;
    register void *rfn __asm__("r12") = (void *)fn;
    register void *rarg __asm__("r13") = arg;
    __asm__ volatile(
        "syscall\n\t"
        "test %%rax, %%rax\n\t"
        "jnz 1f\n\t"
        "xor %%ebp, %%ebp\n\t"
        "mov %%r13, %%rdi\n\t"
        "call *%%r12\n\t"
        "mov %%eax, %%edi\n\t"
        "mov $60, %%eax\n\t"          /* SYS_exit */
        "syscall\n\t"
        "hlt\n\t"
        "1:\n\t"
        : "=a"(ret)
        : "0"((long)SYS_clone3), "D"(ca), "S"(sizeof *ca), "r"(rfn), "r"(rarg)
        : "rcx", "r11", "memory");
    return ret;
}
#endif

/* Spawn the restorer at path with the fds src[] installed at dst[] (errfd: index in src of
 * the error pipe, or -1). set_tid > 0: with that PID (a plain clone3 fork). cgkind: where the
 * child goes: CX_CG_NONE stays in ours; CX_CG_DIR: cgfd is a cgroup2 directory, the kernel
 * places the child there (clone3 CLONE_INTO_CGROUP); CX_CG_PROCS: cgfd is an open
 * cgroup.procs (v1 or v2) the child writes "0" to first thing, before the exec. */
int cx_spawn(const char *path, char *const argv[], const int *src, const int *dst, int nfd,
             const char *cwd, int umask_, int sidmode, int set_tid, int errfd, int cgfd,
             int cgkind)
{
    return cx_spawn_tree(path, argv, src, dst, nfd, cwd, umask_, sidmode, set_tid, errfd, cgfd,
                         cgkind, 0, NULL);
}

/* cx_spawn of a tree's root (set_tid > 0) that forks kids[0..nkids) before its own exec. */
int cx_spawn_tree(const char *path, char *const argv[], const int *src, const int *dst,
                  int nfd, const char *cwd, int umask_, int sidmode, int set_tid, int errfd,
                  int cgfd, int cgkind, int nkids, const struct cx_kid *kids)
{
    struct spawn_args a = { path, argv, src, dst, nfd, umask_, sidmode, errfd, cwd, cgfd,
                            cgkind, nkids, kids };
    if (nkids > 0 && set_tid <= 0)
        return -EINVAL;
    sigset_t all, old;
    long pid;
    if (cgkind != CX_CG_NONE && cgfd < 0)
        return -EBADF;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    struct cx_clone_args ca;
    memset(&ca, 0, sizeof ca);
    ca.exit_signal = SIGCHLD;
    if (cgkind == CX_CG_DIR) {
        ca.flags |= CLONE_INTO_CGROUP;
        ca.cgroup = (uint64_t)cgfd;
    }
    if (set_tid > 0 || cgkind == CX_CG_DIR) {
        pid_t tid = set_tid;
        if (set_tid > 0) {
            ca.set_tid = (uint64_t)(uintptr_t)&tid;
            ca.set_tid_size = 1;
        }
        char *stack = MAP_FAILED;
#ifdef __x86_64__
        if (set_tid <= 0)
            stack = mmap(NULL, SPAWN_STACK, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (stack != MAP_FAILED) {
            /* vfork-style into the cgroup: no copy of this process's page tables */
            ca.flags |= CLONE_VM | CLONE_VFORK;
            ca.stack = (uint64_t)(uintptr_t)stack;
            ca.stack_size = SPAWN_STACK;
            pid = clone3_call(&ca, spawn_child, &a);
            munmap(stack, SPAWN_STACK);
        } else
#endif
        {
            /* a plain fork (set_tid needs clone3, which has no vfork-style libc wrapper) */
            pid = syscall(SYS_clone3, &ca, sizeof ca);
            if (pid == 0)
                _exit(spawn_child(&a));
            if (pid < 0)
                pid = -errno;
        }
    } else {
        /* vfork-style: no copy of this (possibly large) process's page tables */
        char *stack = mmap(NULL, SPAWN_STACK, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (stack == MAP_FAILED) {
            pid = -errno;
        } else {
            pid = clone(spawn_child, stack + SPAWN_STACK, CLONE_VM | CLONE_VFORK | SIGCHLD, &a);
            if (pid < 0)
                pid = -errno;
            munmap(stack, SPAWN_STACK);
        }
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return (int)pid;
}

/* Hand one restore to a ghost (a restorer waiting in ghost mode on the unix socket sock):
 * the fds src[] to install at dst[] (SCM_RIGHTS), cwd, umask, session mode, the index of the
 * error pipe in src[], the plan's fd number and nsidx: 1 + the index in src[] of an fd of the
 * clone's network namespace (0: none), plus 1 + that of its mount namespace << 32. Message layout: see ghost_wait in restorer.c.
 * -EPIPE/-ECONNRESET: the ghost is gone. */
int cx_ghost_send(int sock, const int *src, const int *dst, int nfd, const char *cwd, int umask_,
                  int sidmode, int errindex, int planfd, uint64_t nsidx)
{
    static __thread char buf[CX_GHOST_MSG];
    size_t clen = cwd ? strlen(cwd) : 0;
    size_t len = 64 + (size_t)nfd * 4 + clen;
    if (nfd < 1 || nfd > CX_GHOST_MAXFD || len >= CX_GHOST_MSG)
        return -E2BIG;
    uint64_t h[8] = { 0x3154534f48475843ULL, (uint64_t)nfd, (uint64_t)umask_,
                      (uint64_t)sidmode, (uint64_t)planfd, (uint64_t)errindex, clen,
                      nsidx };
    memcpy(buf, h, 64);
    for (int i = 0; i < nfd; i++)
        memcpy(buf + 64 + 4 * i, &dst[i], 4);
    memcpy(buf + 64 + 4 * nfd, cwd, clen);
    union {
        struct cmsghdr c;
        char b[CMSG_SPACE(sizeof(int) * CX_GHOST_MAXFD)];
    } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct iovec iov = { buf, len };
    struct msghdr mh = { 0 };
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = ctl.b;
    mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfd);
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfd);
    memcpy(CMSG_DATA(c), src, sizeof(int) * nfd);
    ssize_t r;
    do
        r = sendmsg(sock, &mh, MSG_NOSIGNAL);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        return -errno;
    return r == (ssize_t)len ? 0 : -EPROTO;
}
