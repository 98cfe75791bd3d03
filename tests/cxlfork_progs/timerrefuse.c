/* Timers cxlfork refuses at checkpoint (argv[1]): "thread", a glibc SIGEV_THREAD timer (its
 * kernel timer signals a helper thread); "cpu", a timer on the process CPU-time clock. The
 * process must go on unharmed after the refused checkpoint. */
#include "conform.h"
#include <signal.h>
#include <time.h>

static void fn(union sigval v) { (void)v; }

int main(int argc, char **argv)
{
    timer_t t;
    struct sigevent ev = { 0 };
    int thread = argc > 1 && !strcmp(argv[1], "thread");
    ev.sigev_notify = thread ? SIGEV_THREAD : SIGEV_SIGNAL;
    ev.sigev_notify_function = fn;
    ev.sigev_signo = SIGUSR1;
    CHECK(timer_create(thread ? CLOCK_MONOTONIC : CLOCK_PROCESS_CPUTIME_ID, &ev, &t) == 0,
          "timer_create");
    struct itimerspec its = { { 0, 0 }, { 3600, 0 } };
    timer_settime(t, 0, &its, NULL);
    ready();
    wait_go();
    CHECK(timer_gettime(t, &its) == 0 && its.it_value.tv_sec > 0, "the timer is still armed");
    return finish();
}
