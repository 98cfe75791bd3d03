/* cxlfork C helpers: ptrace of a process being checkpointed: freeze (seize + interrupt),
 * waits with a timeout, register sets, rseq configuration, robust list, and syscalls
 * injected at a stop. Every function returns 0 / a count, or -errno. */
#include "cx_internal.h"

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
    /* struct ptrace_rseq_configuration (include/uapi/linux/ptrace.h): u64 rseq_abi_pointer;
     * u32 rseq_abi_size, signature, flags, pad (the signature comes before the flags) */
    struct { uint64_t ptr; uint32_t len, sig, flags, pad; } c;
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
 * way is suppressed and returned in *pending, its siginfo in siginfo (128 bytes), so the
 * caller can queue it again, as it was, at detach (cx_requeue). */
static int wait_syscall_stop(int pid, int *pending, void *siginfo)
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
        if ((st >> 16) == 0 && sig != SIGTRAP && sig != SIGSTOP && pending && !*pending) {
            *pending = sig;
            if (siginfo && ptrace(PTRACE_GETSIGINFO, pid, 0, siginfo) < 0)
                memset(siginfo, 0, 128);
        }
        if (ptrace(PTRACE_SYSCALL, pid, 0, 0) < 0)
            return -errno;
    }
}

int cx_inject(int pid, const void *saved_regs, uint64_t syscall_ip, long nr,
              long a0, long a1, long a2, long a3, long a4, long a5, long *ret, void *siginfo)
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
    if ((e = wait_syscall_stop(pid, &pending, siginfo)) < 0)       /* entry */
        return e;
    if (ptrace(PTRACE_SYSCALL, pid, 0, 0) < 0)
        return -errno;
    if ((e = wait_syscall_stop(pid, &pending, siginfo)) < 0)       /* exit */
        return e;
    if ((e = cx_getregset(pid, NT_PRSTATUS, &r, sizeof r)) < 0)
        return e;
    *ret = (long)r.rax;
    return pending;   /* >0: a signal arrived meanwhile and was held back (siginfo) */
}

/* Queue a held-back signal again on thread tid of tgid with the siginfo it came with (a
 * timer's SI_TIMER and value, a sigqueue's value); where the kernel refuses that (si_code >= 0
 * or SI_TKILL from another process), send it with tgkill. */
int cx_requeue(int tgid, int tid, int sig, const void *siginfo)
{
    if (siginfo && syscall(SYS_rt_tgsigqueueinfo, tgid, tid, sig, siginfo) == 0)
        return 0;
    return syscall(SYS_tgkill, tgid, tid, sig) < 0 ? -errno : 0;
}
