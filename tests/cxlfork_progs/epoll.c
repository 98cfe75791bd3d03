/* epoll: an interest list with a level-triggered, an edge-triggered (EPOLLET), a EPOLLONESHOT
 * and a EPOLLEXCLUSIVE entry (each with its own 64-bit data), an epoll fd inside another
 * epoll fd, and an entry whose fd is a dup of another target. After restore: /proc/self/fdinfo
 * lists the same entries, events arrive with their data, the one-shot entry fires once,
 * EPOLL_CTL_MOD/DEL by the old fd numbers work, and the outer epoll sees the inner one. A
 * third epoll fd watches an expired timerfd (readable: its expiration is carried) and a
 * signalfd (readable once a signal of its mask is sent). A fourth holds two EPOLLONESHOT
 * entries that fired before the checkpoint and were not re-armed, one on a pipe still
 * readable, one on a pipe drained since: neither reports anything after restore, not even
 * when the first's writer hangs up, until re-armed with EPOLL_CTL_MOD. */
#include "conform.h"
#include <errno.h>
#include <fcntl.h>
#include <sys/epoll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <time.h>

static int ep, inner, lt[2], et[2], os_[2], ex, dupfd;

/* the entries of an epoll fd as the kernel lists them (";tfd:events:data;" each, in the
 * kernel's order, which follows file addresses) */
static int entries(int fd, char *out, int len)
{
    char p[64], buf[4096];
    snprintf(p, sizeof p, "/proc/self/fdinfo/%d", fd);
    FILE *f = fopen(p, "r");
    if (!f)
        return -1;
    int n = 0;
    out[0] = ';';
    out[1] = 0;
    n = 1;
    while (fgets(buf, sizeof buf, f)) {
        int t;
        unsigned ev;
        unsigned long long d;
        if (sscanf(buf, "tfd: %d events: %x data: %llx", &t, &ev, &d) == 3)
            n += snprintf(out + n, len - n, "%d:%x:%llx;", t, ev, d);
    }
    fclose(f);
    return n;
}

/* the same entries, in any order */
static int same(const char *a, const char *b)
{
    if (strlen(a) != strlen(b))
        return 0;
    for (const char *p = a; p[1]; p = strchr(p + 1, ';')) {
        char tok[64];
        int k = (int)(strchr(p + 1, ';') - p) + 1;
        snprintf(tok, sizeof tok, "%.*s", k, p);
        if (!strstr(b, tok))
            return 0;
    }
    return 1;
}

static int waitn(int fd, struct epoll_event *evs, int max)
{
    return epoll_wait(fd, evs, max, 0);
}

static int has(struct epoll_event *evs, int n, unsigned long long data)
{
    for (int i = 0; i < n; i++)
        if (evs[i].data.u64 == data)
            return 1;
    return 0;
}

int main(void)
{
    ep = epoll_create1(EPOLL_CLOEXEC);
    inner = epoll_create1(0);
    (void)!pipe(lt);
    (void)!pipe(et);
    (void)!pipe(os_);
    ex = eventfd(0, EFD_NONBLOCK);
    struct epoll_event e = { .events = EPOLLIN, .data.u64 = 0x1111222233334444ULL };
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, lt[0], &e) == 0, "add lt");
    e = (struct epoll_event){ .events = EPOLLIN | EPOLLET, .data.u64 = 0xe7 };
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, et[0], &e) == 0, "add et");
    e = (struct epoll_event){ .events = EPOLLIN | EPOLLONESHOT, .data.u64 = 0x05 };
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, os_[0], &e) == 0, "add oneshot");
    e = (struct epoll_event){ .events = EPOLLIN | EPOLLEXCLUSIVE, .data.u64 = 0xec };
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, ex, &e) == 0, "add exclusive");
    dupfd = dup(lt[1]);                    /* a dup of a pipe end, watched for EPOLLOUT */
    e = (struct epoll_event){ .events = EPOLLOUT, .data.u64 = 0xd0 };
    CHECK(epoll_ctl(inner, EPOLL_CTL_ADD, dupfd, &e) == 0, "add dup to inner");
    e = (struct epoll_event){ .events = EPOLLIN, .data.u64 = 0x1 };
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, inner, &e) == 0, "add inner epoll");
    int ep3 = epoll_create1(0), tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct itimerspec soon = { { 0, 0 }, { 0, 1000000 } };
    timerfd_settime(tfd, 0, &soon, NULL);
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGUSR1);
    sigprocmask(SIG_BLOCK, &m, NULL);
    int sfd = signalfd(-1, &m, SFD_NONBLOCK);
    e = (struct epoll_event){ .events = EPOLLIN, .data.u64 = 0x7f };
    CHECK(epoll_ctl(ep3, EPOLL_CTL_ADD, tfd, &e) == 0, "add timerfd");
    e = (struct epoll_event){ .events = EPOLLIN, .data.u64 = 0x5f };
    CHECK(epoll_ctl(ep3, EPOLL_CTL_ADD, sfd, &e) == 0, "add signalfd");
    int ep4 = epoll_create1(0), f1[2], f2[2];
    (void)!pipe(f1);
    (void)!pipe(f2);
    e = (struct epoll_event){ .events = EPOLLIN | EPOLLONESHOT, .data.u64 = 0xf1 };
    epoll_ctl(ep4, EPOLL_CTL_ADD, f1[0], &e);
    e = (struct epoll_event){ .events = EPOLLIN | EPOLLONESHOT | EPOLLET, .data.u64 = 0xf2 };
    epoll_ctl(ep4, EPOLL_CTL_ADD, f2[0], &e);
    (void)!write(f1[1], "1", 1);
    (void)!write(f2[1], "2", 1);
    struct epoll_event fired[4];
    CHECK(epoll_wait(ep4, fired, 4, 0) == 2, "one-shot entries did not fire");
    char c;
    (void)!read(f2[0], &c, 1);
    struct timespec ms5 = { 0, 5000000 };
    nanosleep(&ms5, NULL);
    char before[1024], after[1024];
    entries(ep, before, sizeof before);
    char inner_before[256], inner_after[256];
    entries(inner, inner_before, sizeof inner_before);
    ready();
    wait_go();
    entries(ep, after, sizeof after);
    entries(inner, inner_after, sizeof inner_after);
    CHECK(same(before, after), "interest list: %s, was %s", after, before);
    CHECK(same(inner_before, inner_after), "inner: %s, was %s", inner_after, inner_before);
    CHECK(fcntl(ep, F_GETFD) & FD_CLOEXEC, "epoll lost FD_CLOEXEC");
    struct epoll_event evs[8];
    int n = waitn(ep, evs, 8);
    CHECK(n == 1 && evs[0].data.u64 == 1, "only the inner epoll ready at first: %d", n);
    (void)!write(lt[1], "a", 1);
    (void)!write(et[1], "b", 1);
    (void)!write(os_[1], "c", 1);
    uint64_t one = 1;
    (void)!write(ex, &one, 8);
    n = waitn(ep, evs, 8);
    CHECK(n == 5 && has(evs, n, 0x1111222233334444ULL) && has(evs, n, 0xe7) &&
          has(evs, n, 0x05) && has(evs, n, 0xec) && has(evs, n, 1), "events: %d", n);
    n = waitn(ep, evs, 8);
    CHECK(n == 3 && !has(evs, n, 0xe7) && !has(evs, n, 0x05), "again (LT stay, ET and "
          "one-shot do not): %d", n);
    n = waitn(inner, evs, 8);
    CHECK(n == 1 && evs[0].data.u64 == 0xd0 && evs[0].events == EPOLLOUT, "inner: %d", n);
    e = (struct epoll_event){ .events = EPOLLIN | EPOLLONESHOT, .data.u64 = 0x55 };
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, os_[0], &e) == 0, "re-arm one-shot: errno %d", errno);
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, lt[0], NULL) == 0, "del lt by its fd: errno %d", errno);
    n = waitn(ep, evs, 8);
    CHECK(n == 3 && has(evs, n, 0x55) && !has(evs, n, 0x1111222233334444ULL), "after mod/del: "
          "%d", n);
    n = waitn(ep4, evs, 8);
    CHECK(n == 0, "fired one-shot entries report again: %d (data %llx)", n,
          n > 0 ? (unsigned long long)evs[0].data.u64 : 0ULL);
    close(f1[1]);
    (void)!write(f2[1], "3", 1);
    n = waitn(ep4, evs, 8);
    CHECK(n == 0, "fired one-shot entries report on hang-up or data: %d", n);
    e = (struct epoll_event){ .events = EPOLLIN | EPOLLONESHOT, .data.u64 = 0xf3 };
    CHECK(epoll_ctl(ep4, EPOLL_CTL_MOD, f2[0], &e) == 0, "re-arm: errno %d", errno);
    n = waitn(ep4, evs, 8);
    CHECK(n == 1 && evs[0].data.u64 == 0xf3, "re-armed one-shot: %d", n);
    n = waitn(ep3, evs, 8);
    CHECK(n == 1 && evs[0].data.u64 == 0x7f, "expired timerfd: %d", n);
    kill(getpid(), SIGUSR1);
    n = waitn(ep3, evs, 8);
    CHECK(n == 2 && has(evs, n, 0x5f), "signalfd: %d", n);
    return finish();
}
