/* timerfd: a relative one-shot CLOCK_MONOTONIC timer an hour away (non-blocking), an absolute
 * CLOCK_REALTIME timer (TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET) an hour away, a periodic
 * CLOCK_BOOTTIME timer (10 ms) left unread for 300 ms before the checkpoint (about 30
 * expirations pending, of which fdinfo shows only the first), an expired one-shot
 * CLOCK_BOOTTIME_ALARM timer (1 expiration pending) and a disarmed CLOCK_REALTIME_ALARM one.
 * After restore each has its clock, flags, time left, interval and pending expirations. */
#include "conform.h"
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/timerfd.h>
#include <time.h>

static void fdinfo(int fd, int *clock, unsigned *flags)
{
    char p[64], buf[256];
    snprintf(p, sizeof p, "/proc/self/fdinfo/%d", fd);
    FILE *f = fopen(p, "r");
    *clock = -1;
    *flags = 99;
    while (f && fgets(buf, sizeof buf, f)) {
        sscanf(buf, "clockid: %d", clock);
        sscanf(buf, "settime flags: %o", flags);
    }
    if (f)
        fclose(f);
}

int main(void)
{
    int rel = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    int abs_ = timerfd_create(CLOCK_REALTIME, 0);
    int per = timerfd_create(CLOCK_BOOTTIME, TFD_NONBLOCK);
    int alarm_ = timerfd_create(CLOCK_BOOTTIME_ALARM, TFD_NONBLOCK);
    int off = timerfd_create(CLOCK_REALTIME_ALARM, 0);
    CHECK(rel >= 0 && abs_ >= 0 && per >= 0 && alarm_ >= 0 && off >= 0, "timerfd_create");
    struct itimerspec hour = { { 0, 0 }, { 3600, 0 } };
    timerfd_settime(rel, 0, &hour, NULL);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    struct itimerspec at = { { 0, 0 }, { now.tv_sec + 3600, now.tv_nsec } };
    timerfd_settime(abs_, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET, &at, NULL);
    struct itimerspec tenms = { { 0, 10000000 }, { 0, 10000000 } };
    timerfd_settime(per, 0, &tenms, NULL);
    struct itimerspec soon = { { 0, 0 }, { 0, 1000000 } };
    timerfd_settime(alarm_, 0, &soon, NULL);
    struct timespec w = { 0, 300000000 };
    nanosleep(&w, NULL);
    ready();
    wait_go();
    int clock;
    unsigned flags;
    struct itimerspec got;
    uint64_t n = 0;
    fdinfo(rel, &clock, &flags);
    CHECK(clock == CLOCK_MONOTONIC && flags == 0, "relative: clock %d flags %o", clock, flags);
    CHECK(timerfd_gettime(rel, &got) == 0 && got.it_value.tv_sec > 3000 &&
          got.it_value.tv_sec < 3600 && got.it_interval.tv_sec == 0, "relative: %ld s left",
          (long)got.it_value.tv_sec);
    CHECK((fcntl(rel, F_GETFL) & O_NONBLOCK) && (fcntl(rel, F_GETFD) & FD_CLOEXEC),
          "relative: flags");
    errno = 0;
    CHECK(read(rel, &n, 8) < 0 && errno == EAGAIN, "relative: read gave %llu, errno %d",
          (unsigned long long)n, errno);
    fdinfo(abs_, &clock, &flags);
    CHECK(clock == CLOCK_REALTIME && flags == 3, "absolute: clock %d flags %o", clock, flags);
    CHECK(!(fcntl(abs_, F_GETFL) & O_NONBLOCK) && !(fcntl(abs_, F_GETFD) & FD_CLOEXEC),
          "absolute: flags");
    clock_gettime(CLOCK_REALTIME, &now);
    CHECK(timerfd_gettime(abs_, &got) == 0 && got.it_value.tv_sec > 3000 &&
          got.it_value.tv_sec < 3600, "absolute: %ld s left", (long)got.it_value.tv_sec);
    fdinfo(per, &clock, &flags);
    CHECK(clock == CLOCK_BOOTTIME, "periodic: clock %d", clock);
    CHECK(timerfd_gettime(per, &got) == 0 && got.it_interval.tv_nsec == 10000000,
          "periodic: interval %ld ns", got.it_interval.tv_nsec);
    CHECK(read(per, &n, 8) == 8 && n >= 20, "periodic: %llu expirations pending",
          (unsigned long long)n);
    w.tv_nsec = 50000000;
    nanosleep(&w, NULL);
    CHECK(read(per, &n, 8) == 8 && n >= 2 && n < 20, "periodic: then %llu",
          (unsigned long long)n);
    fdinfo(alarm_, &clock, &flags);
    CHECK(clock == CLOCK_BOOTTIME_ALARM, "alarm: clock %d", clock);
    n = 0;
    CHECK(read(alarm_, &n, 8) == 8 && n == 1, "alarm: %llu expirations", (unsigned long long)n);
    errno = 0;
    CHECK(read(alarm_, &n, 8) < 0 && errno == EAGAIN, "alarm: read again, errno %d", errno);
    fdinfo(off, &clock, &flags);
    CHECK(clock == CLOCK_REALTIME_ALARM, "disarmed: clock %d", clock);
    CHECK(timerfd_gettime(off, &got) == 0 && !got.it_value.tv_sec && !got.it_value.tv_nsec,
          "disarmed: armed");
    return finish();
}
