/* inotify: watches on a directory (IN_CREATE|IN_DELETE), a file (IN_MODIFY|IN_ONESHOT) and a
 * second directory (IN_ALL_EVENTS|IN_EXCL_UNLINK); the watch in between them was removed, so
 * the descriptors are 1, 3 and 4 (a gap). After restore: the same wds and masks in fdinfo,
 * no stray events (IN_IGNORED, wd 2), events for each directory watch arrive with its wd, a
 * new watch gets the next number, and inotify_rm_watch by the old wds works. The original and
 * the clone watch the same files, so each sees the other's events: each names what it creates
 * with its own PID and skips other names. argv[1]: a scratch directory. */
#include "conform.h"
#include <errno.h>
#include <fcntl.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <time.h>

static char d1[512], d2[512], file[512], other[512];

static int watches(int fd, char *out, int len)
{
    char p[64], buf[512];
    snprintf(p, sizeof p, "/proc/self/fdinfo/%d", fd);
    FILE *f = fopen(p, "r");
    int n = 0;
    out[0] = 0;
    while (f && fgets(buf, sizeof buf, f)) {
        unsigned wd, mask;
        unsigned long ino;
        if (sscanf(buf, "inotify wd:%x ino:%lx sdev:%*x mask:%x", &wd, &ino, &mask) == 3)
            n += snprintf(out + n, len - n, "%u:%lx:%x;", wd, ino, mask);
    }
    if (f)
        fclose(f);
    return n;
}

static int stray;
static char tag[32];

/* the next event about a name with our tag (waits up to 2 s): its wd and mask */
static int next_event(int fd, int *wd, unsigned *mask)
{
    static char buf[4096] __attribute__((aligned(8)));
    static int have, at;
again:
    if (at >= have) {
        struct timespec w = { 0, 10000000 };
        for (int i = 0; i < 200; i++) {
            have = read(fd, buf, sizeof buf);
            if (have > 0)
                break;
            nanosleep(&w, NULL);
        }
        at = 0;
        if (have <= 0)
            return -1;
    }
    struct inotify_event *e = (struct inotify_event *)(buf + at);
    at += sizeof *e + e->len;
    if (e->wd == 2 || (e->mask & IN_IGNORED))
        stray++;
    if (!e->len || !strstr(e->name, tag))
        goto again;
    *wd = e->wd;
    *mask = e->mask;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    snprintf(d1, sizeof d1, "%s/d1", argv[1]);
    snprintf(d2, sizeof d2, "%s/d2", argv[1]);
    snprintf(file, sizeof file, "%s/f", argv[1]);
    snprintf(other, sizeof other, "%s/o", argv[1]);
    mkdir(d1, 0700);
    mkdir(d2, 0700);
    close(open(file, O_CREAT | O_WRONLY, 0600));
    close(open(other, O_CREAT | O_WRONLY, 0600));
    int in = inotify_init1(IN_NONBLOCK);
    int w1 = inotify_add_watch(in, d1, IN_CREATE | IN_DELETE);
    int w2 = inotify_add_watch(in, other, IN_ATTRIB);
    int w3 = inotify_add_watch(in, file, IN_MODIFY | IN_ONESHOT);
    int w4 = inotify_add_watch(in, d2, IN_ALL_EVENTS | IN_EXCL_UNLINK);
    CHECK(w1 == 1 && w2 == 2 && w3 == 3 && w4 == 4, "wds %d %d %d %d", w1, w2, w3, w4);
    inotify_rm_watch(in, w2);
    char ig[256];
    CHECK(read(in, ig, sizeof ig) > 0, "IN_IGNORED of the removed watch");
    char before[512], after[512];
    watches(in, before, sizeof before);
    ready();
    wait_go();
    watches(in, after, sizeof after);
    CHECK(!strcmp(before, after), "watches %s, were %s", after, before);
    CHECK(fcntl(in, F_GETFL) & O_NONBLOCK, "lost O_NONBLOCK");
    char p[600];
    int pid = getpid();
    snprintf(tag, sizeof tag, "-%d-", pid);
    snprintf(p, sizeof p, "%s/new%s", d1, tag);
    close(open(p, O_CREAT | O_WRONLY, 0600));
    int wd = -1;
    unsigned m = 0;
    CHECK(next_event(in, &wd, &m) == 0 && wd == 1 && (m & IN_CREATE), "create: wd %d mask %x",
          wd, m);
    unlink(p);
    CHECK(next_event(in, &wd, &m) == 0 && wd == 1 && (m & IN_DELETE), "delete: wd %d mask %x",
          wd, m);
    snprintf(p, sizeof p, "%s/x%s", d2, tag);
    mkdir(p, 0700);
    CHECK(next_event(in, &wd, &m) == 0 && wd == 4 && (m & IN_CREATE) && (m & IN_ISDIR),
          "mkdir: wd %d mask %x", wd, m);
    rmdir(p);
    CHECK(next_event(in, &wd, &m) == 0 && wd == 4 && (m & IN_DELETE), "rmdir: wd %d %x", wd, m);
    CHECK(!stray, "%d stray events (IN_IGNORED, or of wd 2)", stray);
    int w5 = inotify_add_watch(in, other, IN_ATTRIB);
    CHECK(w5 == 5, "new watch got wd %d", w5);
    CHECK(inotify_rm_watch(in, 1) == 0 && inotify_rm_watch(in, 4) == 0, "rm old wds: errno %d",
          errno);
    return finish();
}
