/* cxlfork-restorer in init mode (argv: restorer init): PID 1 of a clone's new PID namespace
 * (cxlfork/state/pidns.py). It reads the in-namespace PID of the tree's root from fd 0 (EOF
 * first: the restore failed or cxlfork died, it exits and the kernel kills whatever is in the
 * namespace), then reaps the orphans reparented to it until the root has exited, and exits:
 * the kernel then kills what is left in the namespace, as when a container's init exits. */
#include "restorer.h"

#define NR_wait4 61
#define NR_pidfd_open 434

__attribute__((noreturn)) void cx_init_main(void)
{
    int root = 0;
    long r;
    do
        r = sc(NR_read, 0, (long)&root, 4);
    while (r == -4 /* EINTR */);
    if (r != 4 || root <= 1)
        sc(NR_exit_group, 0, 0, 0);
    long pfd = sc(NR_pidfd_open, root, 0, 0);
    sc(NR_close, 0, 0, 0);
    if (pfd < 0)                                 /* the root is gone already */
        sc(NR_exit_group, 0, 0, 0);
    for (;;) {
        struct { int fd; short events, revents; } p = { (int)pfd, 1 /* POLLIN */, 0 };
        r = sc(NR_poll, (long)&p, 1, 500);
        int st;
        while (sc6(NR_wait4, -1, (long)&st, 1 /* WNOHANG */ | 0x40000000 /* __WALL */, 0, 0,
                   0) > 0)
            ;
        if (r > 0)                               /* the root exited */
            sc(NR_exit_group, 0, 0, 0);
    }
}
