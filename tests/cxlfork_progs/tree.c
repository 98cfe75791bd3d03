/* A process tree: the parent forks NKIDS children sharing two pipes with it (commands down,
 * results up); each child sets its own memory and blocks reading a command. After "go" the
 * parent sends one command per child and reads back each child's getpid(), getppid() and
 * memory value; the PIDs must be the ones fork returned, the parent theirs; kill(child, 0)
 * works; waitpid of each stored PID returns its own exit status. A third child exited (status
 * 42) before the checkpoint and was not reaped: a zombie, whose status waitpid returns after. */
#include "conform.h"
#include <signal.h>
#include <sys/wait.h>
#include <signal.h>

#define NKIDS 2
static int secret = 7;

int main(void)
{
    int down[2], up[2];
    pid_t kids[NKIDS];
    if (pipe(down) || pipe(up))
        return 2;
    for (int i = 0; i < NKIDS; i++) {
        kids[i] = fork();
        if (kids[i] == 0) {
            secret = 1000 + i;
            char c;
            if (read(down[0], &c, 1) != 1)
                _exit(99);
            int rec[4] = { i, getpid(), getppid(), secret };
            (void)!write(up[1], rec, sizeof rec);
            _exit(10 + i);
        }
    }
    pid_t z = fork();
    if (z == 0)
        _exit(42);
    siginfo_t si;
    waitid(P_PID, z, &si, WEXITED | WNOWAIT);       /* a zombie now, not reaped */
    ready();
    wait_go();
    CHECK(secret == 7, "parent's memory %d", secret);
    for (int i = 0; i < NKIDS; i++)
        CHECK(kill(kids[i], 0) == 0, "kill(%d, 0) failed", kids[i]);
    (void)!write(down[1], "xx", NKIDS);
    for (int n = 0; n < NKIDS; n++) {
        int rec[4];
        CHECK(read(up[0], rec, sizeof rec) == sizeof rec, "short read of a child's record");
        int i = rec[0];
        CHECK(i >= 0 && i < NKIDS, "bad child index %d", i);
        if (i < 0 || i >= NKIDS)
            break;
        CHECK(rec[1] == kids[i], "child %d: getpid %d, fork returned %d", i, rec[1], kids[i]);
        CHECK(rec[2] == getpid(), "child %d: getppid %d, parent is %d", i, rec[2], getpid());
        CHECK(rec[3] == 1000 + i, "child %d: memory %d", i, rec[3]);
    }
    for (int i = 0; i < NKIDS; i++) {
        int st = 0;
        pid_t r = waitpid(kids[i], &st, 0);
        CHECK(r == kids[i] && WIFEXITED(st) && WEXITSTATUS(st) == 10 + i,
              "waitpid(%d): %d status %#x", kids[i], r, st);
    }
    int zst = 0;
    CHECK(waitpid(z, &zst, WNOHANG) == z && WIFEXITED(zst) && WEXITSTATUS(zst) == 42,
          "zombie %d: status %#x", z, zst);
    return finish();
}
