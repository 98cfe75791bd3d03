/* cxlfork C helpers: what must be C for checkpoint/restore.
 *
 * - a fast streaming 64-bit hash for page-store checksums (4 lanes, 32-byte rounds);
 * - ptrace: seize+interrupt (freeze), register sets, rseq config, syscall injection at a stop;
 * - the page dump: process_vm_readv (or /proc/PID/mem) of page runs straight into the mapped
 *   store file, hashing each batch while it is hot in cache;
 * - spawn of the restorer (clone3, optional set_tid) with its fd table laid out, and the final
 *   ptrace steps that hand the restored registers to the clone.
 * Every function returns 0 / a count, or -errno.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <poll.h>
#include <pthread.h>
#include <unistd.h>
#include <elf.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>

#include "cxlfork_native.h"

#ifndef NT_X86_XSTATE
#define NT_X86_XSTATE 0x202
#endif
#ifndef PTRACE_GET_RSEQ_CONFIGURATION
#define PTRACE_GET_RSEQ_CONFIGURATION 0x420f
#endif

/* ---------------- hash ---------------- */
#define P1 0x9E3779B185EBCA87ULL
#define P2 0xC2B2AE3D27D4EB4FULL
#define P3 0x165667B19E3779F9ULL
static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

void cx_hash_init(cx_hash_t *s)
{
    s->h[0] = P1 + P2; s->h[1] = P2; s->h[2] = 0; s->h[3] = -P1; s->n = 0;
}

void cx_hash_update(cx_hash_t *s, const void *p, uint64_t len)
{
    const uint64_t *w = p;
    uint64_t a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3];
    uint64_t n = len / 32;
    for (uint64_t i = 0; i < n; i++, w += 4) {
        a = rotl(a + w[0] * P2, 31) * P1;
        b = rotl(b + w[1] * P2, 31) * P1;
        c = rotl(c + w[2] * P2, 31) * P1;
        d = rotl(d + w[3] * P2, 31) * P1;
    }
    s->h[0] = a; s->h[1] = b; s->h[2] = c; s->h[3] = d;
    s->n += n * 32;   /* callers pass page multiples; a tail shorter than 32 B is ignored */
}

uint64_t cx_hash_final(const cx_hash_t *s)
{
    uint64_t h = rotl(s->h[0], 1) + rotl(s->h[1], 7) + rotl(s->h[2], 12) + rotl(s->h[3], 18);
    h ^= s->n;
    h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32;
    return h;
}

uint64_t cx_hash_file(int fd, uint64_t off, uint64_t len)
{
    cx_hash_t s;
    cx_hash_init(&s);
    static const uint64_t CH = 4 << 20;
    char *buf = malloc(CH);
    if (!buf)
        return 0;
    while (len) {
        uint64_t want = len < CH ? len : CH;
        ssize_t r = pread(fd, buf, want, off);
        if (r <= 0) {
            free(buf);
            return 0;
        }
        cx_hash_update(&s, buf, r);
        off += r; len -= r;
    }
    free(buf);
    return cx_hash_final(&s);
}

/* ---------------- ptrace ---------------- */
static void tiny_sleep(int us)
{
    struct timespec ts = { 0, us * 1000L };
    nanosleep(&ts, NULL);
}

/* waitpid with a timeout. Children of cxlfork stop within microseconds of being waited for,
 * so: yield a little, then sleep in short steps (at most 50 us of added latency). */
int cx_wait(int pid, int timeout_ms, int *status)
{
    long waited_us = 0;
    int step = 0;
    for (;;) {
        int st = 0;
        pid_t r = waitpid(pid, &st, __WALL | WNOHANG);
        if (r == pid) {
            *status = st;
            return 0;
        }
        if (r < 0)
            return -errno;
        if (waited_us >= (long)timeout_ms * 1000)
            return -ETIMEDOUT;
        if (step < 100) {
            sched_yield();
            waited_us += 1;
        } else {
            int us = step < 1000 ? 10 : 50;
            tiny_sleep(us);
            waited_us += us;
        }
        step++;
    }
}

/* Block until fd is readable or its writers are gone (poll), up to timeout_ms. */
int cx_wait_fd(int fd, int timeout_ms)
{
    struct pollfd p = { fd, POLLIN, 0 };
    for (;;) {
        int r = poll(&p, 1, timeout_ms);
        if (r > 0)
            return 0;
        if (r == 0)
            return -ETIMEDOUT;
        if (errno != EINTR)
            return -errno;
    }
}

int cx_seize(int pid)
{
    if (ptrace(PTRACE_SEIZE, pid, 0, (void *)(long)PTRACE_O_TRACESYSGOOD) < 0)
        return -errno;
    if (ptrace(PTRACE_INTERRUPT, pid, 0, 0) < 0) {
        int e = errno;
        ptrace(PTRACE_DETACH, pid, 0, 0);
        return -e;
    }
    return 0;
}

int cx_detach(int pid, int sig)
{
    return ptrace(PTRACE_DETACH, pid, 0, (void *)(long)sig) < 0 ? -errno : 0;
}

int cx_cont(int pid, int sig)
{
    return ptrace(PTRACE_CONT, pid, 0, (void *)(long)sig) < 0 ? -errno : 0;
}

int cx_getregset(int pid, int type, void *buf, int size)
{
    struct iovec iov = { buf, (size_t)size };
    if (ptrace(PTRACE_GETREGSET, pid, (void *)(long)type, &iov) < 0)
        return -errno;
    return (int)iov.iov_len;
}

int cx_setregset(int pid, int type, const void *buf, int size)
{
    struct iovec iov = { (void *)buf, (size_t)size };
    if (ptrace(PTRACE_SETREGSET, pid, (void *)(long)type, &iov) < 0)
        return -errno;
    return 0;
}

int cx_get_rseq(int pid, uint64_t *out4)
{
    /* struct ptrace_rseq_configuration: u64 rseq_abi_pointer; u32 len, flags, signature, pad */
    struct { uint64_t ptr; uint32_t len, flags, sig, pad; } c;
    memset(&c, 0, sizeof c);
    long r = ptrace(PTRACE_GET_RSEQ_CONFIGURATION, pid, (void *)sizeof c, &c);
    if (r < 0)
        return -errno;
    out4[0] = c.ptr; out4[1] = c.len; out4[2] = c.flags; out4[3] = c.sig;
    return 0;
}

int cx_get_robust_list(int pid, uint64_t *head, uint64_t *len)
{
    void *h = NULL;
    size_t l = 0;
    if (syscall(SYS_get_robust_list, pid, &h, &l) < 0)
        return -errno;
    *head = (uint64_t)(uintptr_t)h;
    *len = l;
    return 0;
}

/* Wait for a syscall stop (SIGTRAP|0x80), passing through other stops. A signal seen on the
 * way is suppressed and returned in *pending so the caller can re-deliver it at detach. */
static int wait_syscall_stop(int pid, int *pending)
{
    for (;;) {
        int st;
        int r = cx_wait(pid, 10000, &st);
        if (r < 0)
            return r;
        if (!WIFSTOPPED(st))
            return -ESRCH;
        int sig = WSTOPSIG(st);
        if (sig == (SIGTRAP | 0x80))
            return 0;
        if ((st >> 16) == 0 && sig != SIGTRAP && sig != SIGSTOP && pending && !*pending)
            *pending = sig;
        if (ptrace(PTRACE_SYSCALL, pid, 0, 0) < 0)
            return -errno;
    }
}

int cx_inject(int pid, const void *saved_regs, uint64_t syscall_ip, long nr,
              long a0, long a1, long a2, long a3, long a4, long a5, long *ret)
{
    struct user_regs_struct r;
    memcpy(&r, saved_regs, sizeof r);
    r.rip = syscall_ip;
    r.rax = nr;
    r.orig_rax = (unsigned long)-1;
    r.rdi = a0; r.rsi = a1; r.rdx = a2; r.r10 = a3; r.r8 = a4; r.r9 = a5;
    int e = cx_setregset(pid, NT_PRSTATUS, &r, sizeof r);
    if (e < 0)
        return e;
    int pending = 0;
    if (ptrace(PTRACE_SYSCALL, pid, 0, 0) < 0)
        return -errno;
    if ((e = wait_syscall_stop(pid, &pending)) < 0)       /* entry */
        return e;
    if (ptrace(PTRACE_SYSCALL, pid, 0, 0) < 0)
        return -errno;
    if ((e = wait_syscall_stop(pid, &pending)) < 0)       /* exit */
        return e;
    if ((e = cx_getregset(pid, NT_PRSTATUS, &r, sizeof r)) < 0)
        return e;
    *ret = (long)r.rax;
    return pending;   /* >0: a signal arrived meanwhile and was held back */
}

int cx_kcmp_file(int pid, int fd1, int fd2)
{
    long r = syscall(SYS_kcmp, pid, pid, 0 /* KCMP_FILE */, fd1, fd2);
    return r < 0 ? -errno : (int)r;
}

int cx_pidfd_getfd(int pid, int fd)
{
    int pfd = syscall(SYS_pidfd_open, pid, 0);
    if (pfd < 0)
        return -errno;
    int r = syscall(SYS_pidfd_getfd, pfd, fd, 0);
    int e = errno;
    close(pfd);
    return r < 0 ? -e : r;
}

int cx_tee(int in_fd, int out_fd, uint64_t len)
{
    ssize_t r = tee(in_fd, out_fd, len, SPLICE_F_NONBLOCK);
    if (r < 0)
        return errno == EAGAIN ? 0 : -errno;
    return (int)r;
}

int cx_memfd(const char *name, int flags)
{
    int r = memfd_create(name, flags);
    return r < 0 ? -errno : r;
}

/* ---------------- page dump ---------------- */
#define BATCH_BYTES ((uint64_t)CX_DUMP_BATCH)
#define MAX_IOV 1024

/* Copy the runs (addr[i], len[i]) of PID's memory (process_vm_readv, or pread of memfd when
 * >= 0: /proc/PID/mem or a shmem object) into the page file, hashing on the way. With outfd
 * < 0 they go to dst (a mapping of the page file); with outfd >= 0 each 1 MiB batch is read
 * into dst (a bounce buffer of BATCH_BYTES, kept in cache), hashed and pwritten to outfd at
 * out_off onwards: tmpfs allocates full-page writes without zeroing them first, and there is
 * no page fault per page of the mapping. */
int64_t cx_dump_runs(int pid, int memfd, int n, const uint64_t *addr, const uint64_t *len,
                     void *dst, cx_hash_t *h, int outfd, uint64_t out_off)
{
    char *out = dst;
    char *bounce = dst;
    uint64_t total = 0;
    int i = 0;
    uint64_t done_in_run = 0;
    struct iovec remote[MAX_IOV];
    while (i < n) {
        /* gather up to BATCH_BYTES of runs (splitting a long run) */
        int k = 0;
        uint64_t batch = 0;
        int j = i;
        uint64_t d = done_in_run;
        while (j < n && k < MAX_IOV && batch < BATCH_BYTES) {
            uint64_t left = len[j] - d;
            uint64_t take = left < BATCH_BYTES - batch ? left : BATCH_BYTES - batch;
            remote[k].iov_base = (void *)(uintptr_t)(addr[j] + d);
            remote[k].iov_len = take;
            k++;
            batch += take;
            d += take;
            if (d == len[j]) {
                j++;
                d = 0;
            }
        }
        uint64_t got = 0;
        char *at = outfd >= 0 ? bounce : out + total;   /* where this batch goes */
        if (memfd < 0) {
            struct iovec local = { at, batch };
            while (got < batch) {
                /* on a partial read, skip the iovecs already done */
                int first = 0;
                uint64_t skip = got;
                while (skip >= remote[first].iov_len) {
                    skip -= remote[first].iov_len;
                    first++;
                }
                remote[first].iov_base = (char *)remote[first].iov_base + skip;
                remote[first].iov_len -= skip;
                local.iov_base = at + got;
                local.iov_len = batch - got;
                ssize_t r = syscall(SYS_process_vm_readv, pid, &local, 1, &remote[first],
                                    k - first, 0);
                if (r < 0)
                    return -errno;
                if (r == 0)
                    return -EFAULT;
                got += r;
            }
        } else {
            for (int q = 0; q < k; q++) {
                uint64_t o = 0;
                while (o < remote[q].iov_len) {
                    ssize_t r = pread(memfd, at + got, remote[q].iov_len - o,
                                      (off_t)(uintptr_t)remote[q].iov_base + o);
                    if (r < 0)
                        return -errno;
                    if (r == 0) {          /* end of a file object: the tail page is zero */
                        memset(at + got, 0, remote[q].iov_len - o);
                        got += remote[q].iov_len - o;
                        break;
                    }
                    o += r;
                    got += r;
                }
            }
        }
        cx_hash_update(h, at, batch);
        if (outfd >= 0) {
            uint64_t w = 0;
            while (w < batch) {
                ssize_t r = pwrite(outfd, at + w, batch - w, (off_t)(out_off + total + w));
                if (r < 0)
                    return -errno;
                w += r;
            }
        }
        total += batch;
        i = j;
        done_in_run = d;
    }
    return (int64_t)total;
}

int cx_mbind_shared(void *addr, uint64_t len, int node)
{
    unsigned long mask[16] = { 0 };
    if (node < 0 || node >= 1024)
        return -EINVAL;
    mask[node / 64] = 1UL << (node % 64);
    if (syscall(SYS_mbind, addr, len, 2 /* MPOL_BIND */, mask, 1025, 0) < 0)
        return -errno;
    return 0;
}

/* ---------------- spawn and finish of the restorer ---------------- */
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
    struct spawn_args a = { path, argv, src, dst, nfd, umask_, sidmode, errfd, cwd, cgfd,
                            cgkind };
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
 * error pipe in src[] and the plan's fd number. Message layout: see ghost_wait in restorer.c.
 * -EPIPE/-ECONNRESET: the ghost is gone. */
int cx_ghost_send(int sock, const int *src, const int *dst, int nfd, const char *cwd, int umask_,
                  int sidmode, int errindex, int planfd)
{
    static __thread char buf[CX_GHOST_MSG];
    size_t clen = cwd ? strlen(cwd) : 0;
    size_t len = 64 + (size_t)nfd * 4 + clen;
    if (nfd < 1 || nfd > CX_GHOST_MAXFD || len >= CX_GHOST_MSG)
        return -E2BIG;
    uint64_t h[8] = { 0x3154534f48475843ULL, (uint64_t)nfd, (uint64_t)umask_,
                      (uint64_t)sidmode, (uint64_t)planfd, (uint64_t)errindex, clen, 0 };
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

/* Take the freshly exec'd restorer under ptrace (PTRACE_O_EXITKILL: if cxlfork dies from now
 * on, the half-made clone dies too) and send it the go byte it waits for before its hand-over.
 * Until then it cannot reach the hand-over; if cxlfork dies first, it reads EOF and exits. */
int cx_start(int pid, int gofd, int traceclone)
{
    long opts = PTRACE_O_EXITKILL | PTRACE_O_TRACESYSGOOD | (traceclone ? PTRACE_O_TRACECLONE : 0);
    if (ptrace(PTRACE_SEIZE, pid, 0, (void *)opts) < 0)
        return -errno;
    char g = 'g';
    if (write(gofd, &g, 1) != 1)
        return -errno;
    return 0;
}

/* Wait for the restorer's hand-over stop: it closes its error pipe (the last of its own fds)
 * and unmaps its region, faulting on the next instruction (SIGSEGV, SEGV_MAPERR at rip inside
 * the region, with munmap's result 0 in rax; orig_rax is -1 at a fault). On an error it writes a line to the pipe and exits. Other signal
 * stops on the way (a SIGSTOP from someone else) are remembered in *pending and passed on at
 * detach. */
int cx_wait_handover(int pid, int errfd, int timeout_ms, int *status_out, int *pending)
{
    int st, e;
    *pending = 0;
    if (errfd >= 0 && (e = cx_wait_fd(errfd, timeout_ms)) < 0)
        return e;
    for (;;) {
        if ((e = cx_wait(pid, timeout_ms, &st)) < 0)
            return e;
        *status_out = st;
        if (!WIFSTOPPED(st))
            return -ECHILD;
        int sig = WSTOPSIG(st);
        if (sig == SIGSEGV && (st >> 16) == 0)
            break;
        if ((st >> 16) == 0 && sig != SIGTRAP && !*pending)
            *pending = sig;
        if (ptrace(PTRACE_CONT, pid, 0, 0) < 0)
            return -errno;
    }
    siginfo_t si;
    struct user_regs_struct r;
    if (ptrace(PTRACE_GETSIGINFO, pid, 0, &si) < 0)
        return -errno;
    if ((e = cx_getregset(pid, NT_PRSTATUS, &r, sizeof r)) < 0)
        return e;
    if (si.si_code != SEGV_MAPERR || (uint64_t)(uintptr_t)si.si_addr != r.rip ||
        r.rip < 0x100000000000UL || r.rip >= 0x100040000000UL || r.rax != 0)
        return -EFAULT;      /* a real crash of the restorer: a bad plan */
    return 0;
}

/* A multi-threaded image: the restorer (traced with PTRACE_O_TRACECLONE) creates nthreads
 * threads; each new one is auto-attached. Let the restorer go on at each clone event (its tid
 * goes to tids[] in creation order), let each thread run to its park (a SIGSEGV at park, where
 * it stays stopped), then send the second go byte. */
int cx_wait_threads(int pid, int nthreads, int *tids, uint64_t park, int gofd, int timeout_ms)
{
    int made = 0, parked = 0, st;
    char done[nthreads > 0 ? nthreads : 1];
    memset(done, 0, sizeof done);
    long waited_us = 0;
    for (int step = 0; parked < nthreads; step++) {
        int progress = 0;
        pid_t r = waitpid(pid, &st, __WALL | WNOHANG);
        if (r < 0)
            return -errno;
        if (r == pid) {
            progress = 1;
            if (!WIFSTOPPED(st))
                return -ECHILD;
            if ((st >> 8) == (SIGTRAP | (PTRACE_EVENT_CLONE << 8))) {
                unsigned long tid;
                if (ptrace(PTRACE_GETEVENTMSG, pid, 0, &tid) < 0)
                    return -errno;
                if (made >= nthreads)
                    return -EPROTO;
                tids[made++] = (int)tid;
            } else if ((st >> 16) == 0 && WSTOPSIG(st) == SIGSEGV) {
                return -EFAULT;                 /* the restorer crashed */
            }
            if (ptrace(PTRACE_CONT, pid, 0, 0) < 0)
                return -errno;
        }
        for (int i = 0; i < made; i++) {
            if (done[i])
                continue;
            r = waitpid(tids[i], &st, __WALL | WNOHANG);
            if (r < 0)
                return -errno;
            if (r != tids[i])
                continue;
            progress = 1;
            if (!WIFSTOPPED(st))
                return -ECHILD;
            if ((st >> 16) == 0 && WSTOPSIG(st) == SIGSEGV) {
                struct user_regs_struct g;
                int e = cx_getregset(tids[i], NT_PRSTATUS, &g, sizeof g);
                if (e < 0)
                    return e;
                if (g.rip != park)
                    return -EFAULT;
                done[i] = 1;
                parked++;
                continue;
            }
            if (ptrace(PTRACE_CONT, tids[i], 0, 0) < 0)   /* its first stop, or a signal */
                return -errno;
        }
        if (progress)
            continue;
        if (waited_us >= (long)timeout_ms * 1000)
            return -ETIMEDOUT;
        int us = step < 1000 ? 10 : 50;
        tiny_sleep(us);
        waited_us += us;
    }
    char g = 'g';
    if (write(gofd, &g, 1) != 1)
        return -errno;
    return 0;
}

int cx_finish(int pid, const void *regs, int rsize, const void *xs, int xsize, uint64_t sigmask,
              int pending)
{
    struct user_regs_struct r;
    int e;
    if (rsize != (int)sizeof r)
        return -EINVAL;
    if (ptrace(PTRACE_SETSIGMASK, pid, (void *)8, &sigmask) < 0)
        return -errno;
    if (xs && xsize > 0 && (e = cx_setregset(pid, NT_X86_XSTATE, xs, xsize)) < 0)
        return e;
    if ((e = cx_setregset(pid, NT_PRSTATUS, regs, rsize)) < 0)
        return e;
    return cx_detach(pid, pending);   /* the SIGSEGV of the hand-over is dropped */
}

int cx_kill(int pid, int sig)
{
    return kill(pid, sig) < 0 ? -errno : 0;
}
