/* Interval timers alone (setitimer), apart from the POSIX timers of timers.c: a periodic
 * ITIMER_REAL (5 ms; a SIGALRM handler counts, SA_RESTART) keeps firing after the restore,
 * and ITIMER_VIRTUAL (100 s, interval 50 s) and ITIMER_PROF (200 s, one-shot) keep their
 * intervals and a time left no larger than they had (plus the kernel's rounding up to a
 * tick). */
#include "conform.h"
#include <signal.h>
#include <sys/time.h>
#include <time.h>

static volatile sig_atomic_t ticks;

static void on_alarm(int sig)
{
    (void)sig;
    ticks++;
}

static long us(struct timeval t) { return t.tv_sec * 1000000L + t.tv_usec; }

int main(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval real = { { 0, 5000 }, { 0, 5000 } }, virt = { { 50, 0 }, { 100, 0 } },
                     prof = { { 0, 0 }, { 200, 0 } }, g;
    setitimer(ITIMER_REAL, &real, NULL);
    setitimer(ITIMER_VIRTUAL, &virt, NULL);
    setitimer(ITIMER_PROF, &prof, NULL);
    ready();
    wait_go();
    getitimer(ITIMER_REAL, &g);
    CHECK(us(g.it_interval) == 5000 && us(g.it_value) > 0, "ITIMER_REAL: interval %ld us, "
          "left %ld us", us(g.it_interval), us(g.it_value));
    getitimer(ITIMER_VIRTUAL, &g);
    CHECK(us(g.it_interval) == 50000000 && us(g.it_value) > 0 &&
          us(g.it_value) <= 100100000, "ITIMER_VIRTUAL: interval %ld us, left %ld us",
          us(g.it_interval), us(g.it_value));
    getitimer(ITIMER_PROF, &g);
    CHECK(us(g.it_interval) == 0 && us(g.it_value) > 0 && us(g.it_value) <= 200100000,
          "ITIMER_PROF: interval %ld us, left %ld us", us(g.it_interval), us(g.it_value));
    int before = ticks;
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    do                                   /* 200 ms: about 40 expirations */
        clock_gettime(CLOCK_MONOTONIC, &t);
    while ((t.tv_sec - t0.tv_sec) * 1000000000L + t.tv_nsec - t0.tv_nsec < 200000000L);
    CHECK(ticks - before >= 5, "ITIMER_REAL fired %d times in 200 ms (5 ms period)",
          (int)(ticks - before));
    return finish();
}
