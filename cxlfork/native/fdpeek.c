/* cxlfork C helpers: looking at a process's fds from outside: kcmp (same open file
 * description?), pidfd_getfd (a copy of one), tee (buffered pipe bytes, not consumed),
 * and memfd_create for the restore side. Every function returns >= 0, or -errno. */
#include "cx_internal.h"

int cx_kcmp_file(int pid, int fd1, int fd2)
{
    long r = syscall(SYS_kcmp, pid, pid, 0 /* KCMP_FILE */, fd1, fd2);
    return r < 0 ? -errno : (int)r;
}

int cx_pidfd_getfd(int pid, int fd)
{
    int pfd = syscall(SYS_pidfd_open, pid, 0);
    if (pfd < 0)
        return -errno;
    int r = syscall(SYS_pidfd_getfd, pfd, fd, 0);
    int e = errno;
    close(pfd);
    return r < 0 ? -e : r;
}

int cx_tee(int in_fd, int out_fd, uint64_t len)
{
    ssize_t r = tee(in_fd, out_fd, len, SPLICE_F_NONBLOCK);
    if (r < 0)
        return errno == EAGAIN ? 0 : -errno;
    return (int)r;
}

int cx_memfd(const char *name, int flags)
{
    int r = memfd_create(name, flags);
    return r < 0 ? -errno : r;
}
