/* cxlfork C helpers: the ptrace side of a restore: seize the restorer and send its go byte,
 * wait for its threads and its hand-over stop, install registers, mask and xstate, detach.
 * Every function returns 0, or -errno. */
#include "cx_internal.h"

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
