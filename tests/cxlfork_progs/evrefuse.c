/* Event fds cxlfork refuses at checkpoint (argv[1]), each with one line naming it; the process
 * must go on unharmed after the refused checkpoint (it checks the fd still works):
 *   fanotify       a fanotify fd
 *   epollclosed    an epoll entry whose fd was closed after EPOLL_CTL_ADD (a dup keeps the
 *                  file open, so the entry stays, keyed by a number nothing is open at)
 *   threadpending  a signal pending for a thread other than the main one (its tid does not
 *                  survive a restore)
 *   inotifyqueued  an inotify fd with an event queued, not yet read
 *   inotifygone    an inotify watch on a file deleted since (argv[2]: a scratch directory)
 *   fifogone       a named FIFO opened and then deleted */
#include "conform.h"
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/fanotify.h>
#include <sys/inotify.h>
#include <sys/signalfd.h>
#include <pthread.h>
#include <sys/stat.h>

static void *blocked_thread(void *arg)
{
    (void)arg;
    for (;;)
        pause();
    return NULL;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";
    const char *dir = argc > 2 ? argv[2] : "/tmp";
    char path[512];
    snprintf(path, sizeof path, "%s/evrefuse-%d", dir, getpid());
    int fd = -1, p[2] = { -1, -1 };
    (void)!pipe(p);
    if (!strcmp(mode, "fanotify")) {
        fd = fanotify_init(FAN_CLASS_NOTIF, O_RDONLY);
    } else if (!strcmp(mode, "epollclosed")) {
        fd = epoll_create1(0);
        struct epoll_event e = { .events = EPOLLIN, .data.u64 = 9 };
        epoll_ctl(fd, EPOLL_CTL_ADD, p[0], &e);
        int keep = dup(p[0]);
        close(p[0]);
        p[0] = keep;
    } else if (!strcmp(mode, "threadpending")) {
        sigset_t m;
        sigemptyset(&m);
        sigaddset(&m, SIGUSR1);
        sigprocmask(SIG_BLOCK, &m, NULL);       /* the thread inherits it */
        fd = signalfd(-1, &m, SFD_NONBLOCK);
        pthread_t t;
        pthread_create(&t, NULL, blocked_thread, NULL);
        pthread_kill(t, SIGUSR1);
    } else if (!strcmp(mode, "inotifyqueued")) {
        fd = inotify_init1(IN_NONBLOCK);
        mkdir(path, 0700);
        inotify_add_watch(fd, path, IN_ATTRIB);
        chmod(path, 0750);
    } else if (!strcmp(mode, "inotifygone")) {
        fd = inotify_init1(IN_NONBLOCK);
        close(open(path, O_CREAT | O_WRONLY, 0600));
        inotify_add_watch(fd, path, IN_MODIFY);
        int keep = open(path, O_RDONLY);          /* the inode lives on, its name does not */
        unlink(path);
        char ev[256];
        (void)!read(fd, ev, sizeof ev);           /* IN_ATTRIB of the unlink */
        (void)keep;
    } else if (!strcmp(mode, "fifogone")) {
        mkfifo(path, 0600);
        fd = open(path, O_RDWR);
        unlink(path);
    }
    CHECK(fd >= 0, "setting up %s: errno %d", mode, errno);
    ready();
    wait_go();
    CHECK(fcntl(fd, F_GETFD) >= 0, "fd %d is gone", fd);
    CHECK(write(p[1], "x", 1) == 1, "pipe");
    if (!strcmp(mode, "threadpending")) {
        struct signalfd_siginfo si;          /* a thread's own signal: not for the main one */
        errno = 0;
        CHECK(read(fd, &si, sizeof si) < 0 && errno == EAGAIN, "read %d", si.ssi_signo);
    }
    rmdir(path);
    return finish();
}
