/* Signals pending at the checkpoint: SIGUSR1 sent with kill (process queue) and a real-time
 * signal with a value sent with sigqueue, both blocked, and SIGUSR2 blocked and sent to the
 * main thread (tgkill). After restore: sigpending lists all three; once unblocked, each
 * reaches its SA_SIGINFO handler with its siginfo (sender PID: the original's, the value). */
#include "conform.h"
#include <signal.h>

static volatile sig_atomic_t got_usr1, got_usr2, got_rt;
static volatile int rt_value, usr1_pid, usr2_code;

static void h(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    if (sig == SIGUSR1) {
        got_usr1++;
        usr1_pid = si->si_pid;
    } else if (sig == SIGUSR2) {
        got_usr2++;
        usr2_code = si->si_code;
    } else {
        got_rt++;
        rt_value = si->si_value.sival_int;
    }
}

int main(void)
{
    struct sigaction sa = { 0 };
    sa.sa_sigaction = h;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGUSR2, &sa, NULL);
    sigaction(SIGRTMIN + 5, &sa, NULL);
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGUSR1);
    sigaddset(&m, SIGUSR2);
    sigaddset(&m, SIGRTMIN + 5);
    sigprocmask(SIG_BLOCK, &m, NULL);
    pid_t me = getpid();
    kill(me, SIGUSR1);
    union sigval v = { .sival_int = 4242 };
    sigqueue(me, SIGRTMIN + 5, v);
    tgkill(me, gettid(), SIGUSR2);
    ready();
    wait_go();
    sigset_t p;
    sigpending(&p);
    CHECK(sigismember(&p, SIGUSR1) && sigismember(&p, SIGUSR2) &&
          sigismember(&p, SIGRTMIN + 5), "pending: USR1 %d USR2 %d RT %d",
          sigismember(&p, SIGUSR1), sigismember(&p, SIGUSR2), sigismember(&p, SIGRTMIN + 5));
    CHECK(!got_usr1 && !got_usr2 && !got_rt, "delivered while blocked");
    sigprocmask(SIG_UNBLOCK, &m, NULL);
    CHECK(got_usr1 == 1 && usr1_pid == me, "SIGUSR1: %d from %d", got_usr1, usr1_pid);
    CHECK(got_usr2 == 1 && usr2_code == SI_TKILL, "SIGUSR2: %d code %d", got_usr2, usr2_code);
    CHECK(got_rt == 1 && rt_value == 4242, "real-time: %d value %d", got_rt, rt_value);
    return finish();
}
