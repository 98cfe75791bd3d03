/* signalfd: one fd for SIGUSR1 and a real-time signal (non-blocking, FD_CLOEXEC), one for
 * SIGUSR2 (blocking); at the checkpoint three signals are pending: SIGUSR2 (kill, the process
 * queue), the real-time one with a value (sigqueue) and SIGUSR1 for the main thread (tgkill).
 * After restore: the masks (fdinfo and what each fd reads), the flags, the pending signals
 * read with their siginfo (sender PID: the original's), then signals sent afterwards. */
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
    pid_t me = getpid();
    union sigval v55 = { .sival_int = 55 };
    kill(me, SIGUSR2);
    sigqueue(me, SIGRTMIN + 2, v55);
    tgkill(me, gettid(), SIGUSR1);
    ready();
    wait_go();
    CHECK(mask_of(fa) == ma && mask_of(fb) == mb, "masks %llx %llx, were %llx %llx",
          mask_of(fa), mask_of(fb), ma, mb);
    CHECK((fcntl(fa, F_GETFL) & O_NONBLOCK) && (fcntl(fa, F_GETFD) & FD_CLOEXEC), "fa flags");
    CHECK(!(fcntl(fb, F_GETFL) & O_NONBLOCK) && !(fcntl(fb, F_GETFD) & FD_CLOEXEC), "fb flags");
    struct signalfd_siginfo si;
    CHECK(read(fb, &si, sizeof si) == sizeof si && si.ssi_signo == SIGUSR2 &&
          si.ssi_pid == (unsigned)me && si.ssi_code == SI_USER, "pending SIGUSR2: %d from %u",
          si.ssi_signo, si.ssi_pid);
    CHECK(read(fa, &si, sizeof si) == sizeof si && si.ssi_signo == SIGUSR1 &&
          si.ssi_code == SI_TKILL, "pending SIGUSR1 (thread): %d code %d", si.ssi_signo,
          si.ssi_code);
    CHECK(read(fa, &si, sizeof si) == sizeof si && si.ssi_signo == (unsigned)SIGRTMIN + 2 &&
          si.ssi_int == 55 && si.ssi_code == SI_QUEUE, "pending real-time: %d value %d",
          si.ssi_signo, si.ssi_int);
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
