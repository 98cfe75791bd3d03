/* POSIX timers and interval timers: a periodic SIGEV_SIGNAL timer (2 ms, SIGUSR2, a handler
 * counts) keeps firing, a one-shot CLOCK_MONOTONIC timer and a periodic SIGEV_NONE
 * CLOCK_REALTIME one and a SIGEV_THREAD_ID one aimed at the main thread keep their remaining
 * times and intervals under the same timer IDs, and ITIMER_REAL / ITIMER_PROF keep theirs. */
#include "conform.h"
#include <errno.h>
#include <signal.h>
#include <sys/time.h>
#include <time.h>

static volatile sig_atomic_t ticks, value_ok = 1;

static void tick(int sig, siginfo_t *si, void *uc)
{
    (void)sig; (void)uc;
    if (si->si_code != SI_TIMER || si->si_value.sival_int != 42)
        value_ok = 0;
    ticks++;
}

int main(void)
{
    struct sigaction sa = { 0 };
    sa.sa_sigaction = tick;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGUSR2, &sa, NULL);
    timer_t periodic, oneshot, none, tidt;
    struct sigevent ev = { 0 };
    ev.sigev_notify = SIGEV_SIGNAL;
    ev.sigev_signo = SIGUSR2;
    ev.sigev_value.sival_int = 42;
    CHECK(timer_create(CLOCK_MONOTONIC, &ev, &periodic) == 0, "timer_create");
    ev.sigev_signo = SIGUSR1;                  /* never fires within the test */
    ev.sigev_value.sival_int = 7;
    CHECK(timer_create(CLOCK_MONOTONIC, &ev, &oneshot) == 0, "timer_create 2");
    ev.sigev_notify = SIGEV_NONE;
    CHECK(timer_create(CLOCK_REALTIME, &ev, &none) == 0, "timer_create 3");
    ev.sigev_notify = SIGEV_THREAD_ID;
    ev.sigev_signo = SIGUSR1;
    ev._sigev_un._tid = gettid();
    CHECK(timer_create(CLOCK_BOOTTIME, &ev, &tidt) == 0, "timer_create 4");
    struct itimerspec tt = { { 0, 0 }, { 2000, 0 } };
    timer_settime(tidt, 0, &tt, NULL);
    struct itimerspec its = { { 0, 2000000 }, { 0, 2000000 } };
    timer_settime(periodic, 0, &its, NULL);
    struct itimerspec one = { { 0, 0 }, { 3600, 0 } };
    timer_settime(oneshot, 0, &one, NULL);
    struct itimerspec nn = { { 7, 0 }, { 100, 0 } };
    timer_settime(none, 0, &nn, NULL);
    struct itimerval real = { { 0, 0 }, { 3000, 0 } }, prof = { { 5, 0 }, { 1000, 0 } };
    setitimer(ITIMER_REAL, &real, NULL);
    setitimer(ITIMER_PROF, &prof, NULL);
    ready();
    wait_go();
    struct itimerspec got;
    CHECK(timer_gettime(oneshot, &got) == 0 && got.it_value.tv_sec > 3000 &&
          got.it_value.tv_sec < 3600 && got.it_interval.tv_sec == 0, "one-shot timer: %ld s",
          (long)got.it_value.tv_sec);
    CHECK(timer_gettime(none, &got) == 0 && got.it_interval.tv_sec == 7 &&
          got.it_value.tv_sec > 0 && got.it_value.tv_sec <= 100, "SIGEV_NONE timer");
    CHECK(timer_gettime(tidt, &got) == 0 && got.it_value.tv_sec > 1000 &&
          got.it_value.tv_sec < 2000, "SIGEV_THREAD_ID timer: %ld s", (long)got.it_value.tv_sec);
    CHECK(timer_gettime(periodic, &got) == 0 && got.it_interval.tv_nsec == 2000000,
          "periodic timer interval");
    struct itimerval iv;
    CHECK(getitimer(ITIMER_REAL, &iv) == 0 && iv.it_value.tv_sec > 2000 &&
          iv.it_value.tv_sec < 3000, "ITIMER_REAL: %ld s", (long)iv.it_value.tv_sec);
    CHECK(getitimer(ITIMER_PROF, &iv) == 0 && iv.it_interval.tv_sec == 5 &&
          iv.it_value.tv_sec > 900 && iv.it_value.tv_sec <= 1000, "ITIMER_PROF");
    int t0 = ticks;
    struct timespec wait = { 0, 10000000 };
    for (int i = 0; i < 500 && ticks < t0 + 3; i++)
        nanosleep(&wait, NULL);
    CHECK(ticks >= t0 + 3, "the periodic timer stopped firing (%d ticks)", ticks - t0);
    CHECK(value_ok, "timer signal value");
    return finish();
}
