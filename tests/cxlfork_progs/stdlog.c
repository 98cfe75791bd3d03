/* A daemon writing its log on stdout and stderr (for `restore --stdio original`): prints
 * "start PID" on fd 1, then for each SIGUSR1 "out PID N" on fd 1 and "err PID N" on fd 2
 * (write(2), no stdio buffer: the bytes are in the file when the call returns). SIGTERM ends
 * it. SIGUSR1 stays blocked and is taken with sigwaitinfo (where the checkpoint finds it), so
 * one sent at any time is never lost. With an argument UID it first
 * takes UID as its file-system uid and gid, with no groups (setfsuid: its files are opened as
 * that user's; its real and effective uid stay, so root can still checkpoint it where root
 * lacks CAP_SYS_RESOURCE, which reading another user's rlimits needs). */
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <unistd.h>

static void say(int fd, const char *what, int n)
{
    char b[64];
    int len = snprintf(b, sizeof b, "%s %d %d\n", what, (int)getpid(), n);
    (void)!write(fd, b, len);
}

int main(int argc, char **argv)
{
    if (argc > 1) {
        unsigned id = (unsigned)atoi(argv[1]);
        if (setgroups(0, NULL) != 0)
            return 2;
        setfsgid(id);
        setfsuid(id);
    }
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    sigprocmask(SIG_BLOCK, &block, NULL);
    say(1, "start", 0);
    int done = 0;
    for (;;) {
        if (sigwaitinfo(&block, NULL) != SIGUSR1)
            continue;                    /* EINTR */
        done++;
        say(1, "out", done);
        say(2, "err", done);
    }
}
