/* cxlfork C helpers: network namespaces of the calling thread (Python 3.11 has no
 * os.unshare/os.setns): unshare(CLONE_NEWNET) and setns. A network namespace is per thread,
 * so the thread that restores a clone enters the clone's namespace, makes its sockets there
 * and goes back. Every function returns >= 0, or -errno. */
#include "cx_internal.h"
#include <sched.h>

int cx_unshare(int flags)
{
    return unshare(flags) < 0 ? -errno : 0;
}

int cx_setns(int fd, int nstype)
{
    return setns(fd, nstype) < 0 ? -errno : 0;
}
