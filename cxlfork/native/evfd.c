/* cxlfork C helpers for event and timer fds (cxlfork/state/epoll.py, timerfd.py, signalfd.py,
 * inotify.py): kcmp of an epoll interest entry's target, timerfd/signalfd/inotify creation
 * for a clone, open_by_handle_at to resolve an inotify watch's file handle to a path, the
 * pending signals of a stopped thread (cxlfork/state/pending.py).
 * Every function returns >= 0, or -errno. */
#include "cx_internal.h"
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <linux/kcmp.h>

#define TFD_IOC_SET_TICKS _IOW('T', 0, uint64_t)

int cx_kcmp_epoll_tfd(int pid, int fd, int epfd, int tfd, int toff)
{
    struct kcmp_epoll_slot slot = { (uint32_t)epfd, (uint32_t)tfd, (uint32_t)toff };
    long r = syscall(SYS_kcmp, pid, pid, KCMP_EPOLL_TFD, fd, &slot);
    return r < 0 ? -errno : (int)r;
}

int cx_timerfd_make(int clock, int flags, int settime_flags, int64_t isec, int64_t insec,
                    int64_t vsec, int64_t vnsec, uint64_t ticks)
{
    int fd = timerfd_create(clock, flags);
    if (fd < 0)
        return -errno;
    if (vsec || vnsec) {
        struct itimerspec its = { { isec, insec }, { vsec, vnsec } };
        if (timerfd_settime(fd, settime_flags, &its, NULL) < 0)
            goto fail;
    }
    if (ticks && ioctl(fd, TFD_IOC_SET_TICKS, &ticks) < 0)
        goto fail;
    return fd;
fail: {
        int e = errno;
        close(fd);
        return -e;
    }
}

/* The expirations pending on a timerfd that has some (fdinfo's ticks > 0, so the read does
 * not block), overruns included: read them (which re-arms a periodic timer) and put the same
 * count straight back, so the owner still reads them. */
int cx_timerfd_take_ticks(int fd, uint64_t *out)
{
    uint64_t n = 0;
    if (read(fd, &n, 8) != 8)
        return errno ? -errno : -EIO;
    *out = n;
    return ioctl(fd, TFD_IOC_SET_TICKS, &n) < 0 ? -errno : 0;
}

int cx_signalfd_make(uint64_t mask, int flags)
{
    int fd = signalfd(-1, (const sigset_t *)&mask, flags);
    return fd < 0 ? -errno : fd;
}

int cx_inotify_init(int flags)
{
    int fd = inotify_init1(flags);
    return fd < 0 ? -errno : fd;
}

int cx_inotify_add(int fd, const char *path, uint32_t mask)
{
    int wd = inotify_add_watch(fd, path, mask);
    return wd < 0 ? -errno : wd;
}

int cx_inotify_rm(int fd, int wd)
{
    return inotify_rm_watch(fd, wd) < 0 ? -errno : 0;
}

int cx_open_by_handle(int mount_fd, int type, const unsigned char *bytes, int len, int flags)
{
    struct { struct file_handle h; unsigned char b[128]; } fh;
    if (len < 0 || len > 128)
        return -EINVAL;
    fh.h.handle_bytes = (unsigned)len;
    fh.h.handle_type = type;
    memcpy(fh.h.f_handle, bytes, len);
    int fd = open_by_handle_at(mount_fd, &fh.h, flags);
    return fd < 0 ? -errno : fd;
}

/* Up to max siginfos (128 bytes each) pending for thread tid (shared: the process-wide queue
 * instead of the thread's own), without dequeuing them (PTRACE_PEEKSIGINFO; tid is stopped
 * under our ptrace). Returns how many. */
int cx_peek_siginfo(int tid, int shared, int max, void *buf)
{
    struct { uint64_t off; uint32_t flags; int32_t nr; } args = { 0, shared ? 1 : 0, max };
    long r = ptrace(0x4209 /* PTRACE_PEEKSIGINFO */, tid, &args, buf);
    return r < 0 ? -errno : (int)r;
}
