/* signalfd: one fd for SIGUSR1 and a real-time signal (non-blocking, FD_CLOEXEC), one for
 * SIGUSR2 (blocking). After restore: the masks (fdinfo and what each fd reads), the flags, and
 * signals sent to itself arrive on the right fd with their siginfo. */
#include "conform.h"
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/signalfd.h>

static unsigned long long mask_of(int fd)
{
    char p[64], buf[256];
    unsigned long long m = 0;
    snprintf(p, sizeof p, "/proc/self/fdinfo/%d", fd);
    FILE *f = fopen(p, "r");
    while (f && fgets(buf, sizeof buf, f))
        sscanf(buf, "sigmask: %llx", &m);
    if (f)
        fclose(f);
    return m;
}

int main(void)
{
    sigset_t a, b, all;
    sigemptyset(&a);
    sigaddset(&a, SIGUSR1);
    sigaddset(&a, SIGRTMIN + 2);
    sigemptyset(&b);
    sigaddset(&b, SIGUSR2);
    sigemptyset(&all);
    sigaddset(&all, SIGUSR1);
    sigaddset(&all, SIGUSR2);
    sigaddset(&all, SIGRTMIN + 2);
    sigprocmask(SIG_BLOCK, &all, NULL);
    int fa = signalfd(-1, &a, SFD_NONBLOCK | SFD_CLOEXEC);
    int fb = signalfd(-1, &b, 0);
    CHECK(fa >= 0 && fb >= 0, "signalfd");
    unsigned long long ma = mask_of(fa), mb = mask_of(fb);
    ready();
    wait_go();
    CHECK(mask_of(fa) == ma && mask_of(fb) == mb, "masks %llx %llx, were %llx %llx",
          mask_of(fa), mask_of(fb), ma, mb);
    CHECK((fcntl(fa, F_GETFL) & O_NONBLOCK) && (fcntl(fa, F_GETFD) & FD_CLOEXEC), "fa flags");
    CHECK(!(fcntl(fb, F_GETFL) & O_NONBLOCK) && !(fcntl(fb, F_GETFD) & FD_CLOEXEC), "fb flags");
    struct signalfd_siginfo si;
    errno = 0;
    CHECK(read(fa, &si, sizeof si) < 0 && errno == EAGAIN, "fa not empty: errno %d", errno);
    union sigval v = { .sival_int = 77 };
    sigqueue(getpid(), SIGRTMIN + 2, v);
    kill(getpid(), SIGUSR2);
    kill(getpid(), SIGUSR1);
    CHECK(read(fb, &si, sizeof si) == sizeof si && si.ssi_signo == SIGUSR2, "fb read %d",
          si.ssi_signo);
    CHECK(read(fa, &si, sizeof si) == sizeof si && si.ssi_signo == SIGUSR1 &&
          si.ssi_pid == (unsigned)getpid(), "fa first %d", si.ssi_signo);
    CHECK(read(fa, &si, sizeof si) == sizeof si && si.ssi_signo == (unsigned)SIGRTMIN + 2 &&
          si.ssi_int == 77, "fa second %d value %d", si.ssi_signo, si.ssi_int);
    return finish();
}
