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

/* open(path, flags) with the file-system credentials of another user: uid/gid as fsuid and
 * fsgid, groups as the supplementary groups (ngroups < 0: keep the caller's credentials).
 * Credentials belong to a thread in Linux (the raw syscalls change only the caller's; glibc's
 * wrappers would change every thread's), so the open runs in a thread of its own that ends
 * right after: the caller's credentials are never touched. fsuid 0 -> non-zero drops the file
 * capabilities (CAP_DAC_OVERRIDE...) from that thread, so permissions are checked as they are
 * for that user. A symlink at the last component is not followed (-ELOOP), without putting
 * O_NOFOLLOW in the file's status flags: the path is opened O_PATH|O_NOFOLLOW, then that
 * inode reopened through /proc/self/fd (a permission check as the user again).
 * Returns the fd or -errno. */
struct open_as {
    const char *path;
    int flags, ngroups, ret;
    uid_t uid;
    gid_t gid;
    const gid_t *groups;
};

static void *open_as_thread(void *arg)
{
    struct open_as *a = arg;
    if (a->ngroups >= 0) {
        if (syscall(SYS_setgroups, a->ngroups, a->groups) < 0) {
            a->ret = -errno;
            return NULL;
        }
        syscall(SYS_setfsgid, a->gid);
        syscall(SYS_setfsuid, a->uid);
        /* setfsuid/setfsgid report no error: read back (-1 changes nothing) */
        if ((uid_t)syscall(SYS_setfsuid, -1) != a->uid ||
            (gid_t)syscall(SYS_setfsgid, -1) != a->gid) {
            a->ret = -EPERM;
            return NULL;
        }
    }
    int pfd = open(a->path, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (pfd < 0) {
        a->ret = -errno;
        return NULL;
    }
    struct stat st;
    if (fstat(pfd, &st) < 0 || S_ISLNK(st.st_mode)) {
        a->ret = S_ISLNK(st.st_mode) ? -ELOOP : -errno;
        close(pfd);
        return NULL;
    }
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", pfd);
    int fd = open(proc, a->flags);
    a->ret = fd < 0 ? -errno : fd;
    close(pfd);
    return NULL;
}

int cx_open_as(const char *path, int flags, unsigned uid, unsigned gid, int ngroups,
               const unsigned *groups)
{
    struct open_as a = { path, flags, ngroups, -EINVAL, uid, gid, (const gid_t *)groups };
    pthread_t t;
    int e = pthread_create(&t, NULL, open_as_thread, &a);
    if (e)
        return -e;
    pthread_join(t, NULL);
    return a.ret;
}
