/* cxlfork C helpers: namespaces of the calling thread (Python 3.11 has no os.unshare/
 * os.setns/mount): unshare, setns, mount. A network namespace is per thread,
 * so the thread that restores a clone enters the clone's namespace, makes its sockets there
 * and goes back. Every function returns >= 0, or -errno. */
#include "cx_internal.h"
#include <sched.h>
#include <sys/mount.h>

int cx_unshare(int flags)
{
    return unshare(flags) < 0 ? -errno : 0;
}

int cx_setns(int fd, int nstype)
{
    return setns(fd, nstype) < 0 ? -errno : 0;
}

/* mount(2) for a clone's own mount namespace (a bind mount, or making "/" private) */
int cx_mount(const char *src, const char *dst, const char *fstype, unsigned long flags)
{
    return mount(src, dst, fstype, flags, NULL) < 0 ? -errno : 0;
}

int cx_umount2(const char *dst, int flags)
{
    return umount2(dst, flags) < 0 ? -errno : 0;
}
