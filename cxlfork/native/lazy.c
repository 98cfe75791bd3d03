/* Lazy migrate-on-access (moa) for restored clones: a userfaultfd handler.
 *
 * A lazy moa clone is restored like a mow clone (each stored run mapped MAP_PRIVATE from the
 * page file), and its restorer registers those runs with a userfaultfd in MINOR mode: the
 * first touch of such a page (read or write) stops the clone's thread at a minor fault, because
 * the page is in the store's page cache but not yet mapped. The handler copies the block of
 * LZ_BLOCK bytes around the fault (clipped to the run) from the store into the clone's private
 * anonymous memory with UFFDIO_COPY (a MAP_PRIVATE shmem mapping gets anonymous pages), which
 * maps it and wakes the thread. Pages nobody touches stay shared from the store.
 *
 * Safe by construction: if the handler goes away (its process exits), the kernel unregisters
 * the ranges and later faults map the store's pages as in mow, with the same contents. A range
 * the clone moves with mremap, and the memory of the clone's own children, lose the
 * registration the same way (no UFFD_FEATURE_EVENT_REMAP / EVENT_FORK is asked for).
 *
 * The restorer sends the userfaultfd over a unix socket (SCM_RIGHTS); cx_lazy_add hands that
 * socket, a pidfd of the clone and the run table to the handler, which runs in its own pthread
 * (cx_lazy_add starts it) or in the calling thread (cx_lazy_serve, for a process that stays
 * behind a detached restore). A clone is forgotten when its pidfd reports its exit.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/userfaultfd.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>

#include "cxlfork_native.h"

#define PAGE 4096UL
#define LZ_BLOCK ((uint64_t)CX_LAZY_BLOCK)

struct lz_run {
    uint64_t addr, len, off;    /* clone address, bytes, offset in the page file */
};

struct lz_clone {
    int sock, uffd, pidfd;
    const char *store;          /* the page file, mapped read-only */
    uint64_t store_len;
    struct lz_run *runs;
    int nruns;
    uint64_t copied;            /* pages copied into this clone */
    struct lz_clone *next;
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct lz_clone *clones;
static int nclones;
static int evfd = -1;
static int thread_started;
static uint64_t total_copied, total_faults;

static void lz_free(struct lz_clone *c)
{
    if (c->sock >= 0)
        close(c->sock);
    if (c->uffd >= 0)
        close(c->uffd);
    if (c->pidfd >= 0)
        close(c->pidfd);
    if (c->store)
        munmap((void *)c->store, c->store_len);
    free(c->runs);
    free(c);
}

static const struct lz_run *find_run(const struct lz_clone *c, uint64_t a)
{
    int lo = 0, hi = c->nruns;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        const struct lz_run *r = &c->runs[mid];
        if (a < r->addr)
            hi = mid;
        else if (a >= r->addr + r->len)
            lo = mid + 1;
        else
            return r;
    }
    return NULL;
}

static long uffd_copy(int uffd, uint64_t dst, const void *src, uint64_t len, int64_t *copied)
{
    struct uffdio_copy cp = { .dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len, .mode = 0 };
    long r = ioctl(uffd, UFFDIO_COPY, &cp);
    *copied = cp.copy > 0 ? cp.copy : 0;
    return r < 0 ? -errno : 0;
}

/* Resolve one fault; returns -ESRCH when the clone's memory is gone. */
static int serve_fault(struct lz_clone *c, uint64_t addr)
{
    uint64_t page = addr & ~(PAGE - 1);
    const struct lz_run *r = find_run(c, page);
    total_faults++;
    if (!r) {
        /* not one of ours (cannot happen for registered runs): map the page cache page */
        struct uffdio_continue co = { .range = { page, PAGE }, .mode = 0 };
        if (ioctl(c->uffd, UFFDIO_CONTINUE, &co) < 0 && errno != EEXIST)
            return errno == ESRCH || errno == ENOENT ? -ESRCH : 0;
        return 0;
    }
    uint64_t start = page & ~(uint64_t)(LZ_BLOCK - 1);
    if (start < r->addr)
        start = r->addr;
    uint64_t end = start + LZ_BLOCK;
    if (end > r->addr + r->len)
        end = r->addr + r->len;
    int64_t n = 0;
    long e;
    for (int tries = 0; tries < 3; tries++) {
        e = uffd_copy(c->uffd, start, c->store + r->off + (start - r->addr), end - start, &n);
        if (e != -EAGAIN)
            break;
    }
    if (e == -ESRCH || e == -ENOENT)
        return -ESRCH;
    c->copied += n / PAGE;
    total_copied += n / PAGE;
    if (page >= start && page < start + (uint64_t)n)
        return 0;
    /* the block stopped early (a page in it was mapped already): just the faulting page */
    e = uffd_copy(c->uffd, page, c->store + r->off + (page - r->addr), PAGE, &n);
    if (e == 0) {
        c->copied++;
        total_copied++;
        return 0;
    }
    if (e == -ESRCH || e == -ENOENT)
        return -ESRCH;
    struct uffdio_range wr = { page, PAGE };   /* EEXIST: mapped meanwhile; wake the waiter */
    ioctl(c->uffd, UFFDIO_WAKE, &wr);
    return 0;
}

static int recv_uffd(int sock)
{
    char byte;
    struct iovec iov = { &byte, 1 };
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } u;
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                         .msg_controllen = sizeof u.buf };
    ssize_t r = recvmsg(sock, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (r <= 0)
        return r == 0 ? -EPIPE : -errno;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    if (!cm || cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
        return -EPROTO;
    int fd;
    memcpy(&fd, CMSG_DATA(cm), sizeof fd);
    return fd;
}

/* One round: wait for something (up to timeout_ms), handle it. Caller holds no lock. */
static int serve_once(int timeout_ms)
{
    pthread_mutex_lock(&mu);
    int n = 0, cap = 1 + 2 * nclones;
    struct pollfd *p = calloc(cap, sizeof *p);
    struct lz_clone **who = calloc(cap, sizeof *who);
    if (!p || !who) {
        pthread_mutex_unlock(&mu);
        free(p);
        free(who);
        return -ENOMEM;
    }
    p[n++] = (struct pollfd){ evfd, POLLIN, 0 };
    for (struct lz_clone *c = clones; c; c = c->next) {
        who[n] = c;
        p[n++] = (struct pollfd){ c->uffd >= 0 ? c->uffd : c->sock, POLLIN, 0 };
        who[n] = c;
        p[n++] = (struct pollfd){ c->pidfd, POLLIN, 0 };
    }
    pthread_mutex_unlock(&mu);
    int r = poll(p, n, timeout_ms);
    pthread_mutex_lock(&mu);
    if (r > 0) {
        if (p[0].revents) {
            uint64_t v;
            (void)!read(evfd, &v, sizeof v);
        }
        for (int i = 1; i < n; i++) {
            struct lz_clone *c = who[i];
            if (!p[i].revents || c->pidfd < 0)
                continue;
            int dead = 0;
            if (p[i].fd == c->pidfd) {
                dead = 1;                              /* the clone exited */
            } else if (p[i].fd == c->sock) {
                int u = recv_uffd(c->sock);
                if (u >= 0) {
                    c->uffd = u;
                    close(c->sock);
                    c->sock = -1;
                } else {
                    dead = 1;     /* the restorer died before sending: nothing to serve */
                }
            } else {
                struct uffd_msg msg[16];
                for (;;) {
                    ssize_t k = read(c->uffd, msg, sizeof msg);
                    if (k <= 0)
                        break;
                    for (size_t j = 0; j < (size_t)k / sizeof msg[0]; j++)
                        if (msg[j].event == UFFD_EVENT_PAGEFAULT &&
                            serve_fault(c, msg[j].arg.pagefault.address) == -ESRCH)
                            dead = 1;
                }
            }
            if (dead) {
                close(c->pidfd);
                c->pidfd = -1;                     /* unlinked below */
            }
        }
        for (struct lz_clone **pp = &clones; *pp;) {
            struct lz_clone *c = *pp;
            if (c->pidfd < 0) {
                *pp = c->next;
                lz_free(c);
                nclones--;
            } else {
                pp = &c->next;
            }
        }
    }
    int left = nclones;
    pthread_mutex_unlock(&mu);
    free(p);
    free(who);
    return r < 0 && errno != EINTR ? -errno : left;
}

static void *thread_main(void *arg)
{
    (void)arg;
    for (;;)
        serve_once(-1);
    return NULL;
}

int cx_lazy_add(int sock, int pidfd, int store_fd, uint64_t store_len, int n,
                const uint64_t *addr, const uint64_t *len, const uint64_t *off)
{
    struct lz_clone *c = calloc(1, sizeof *c);
    if (!c)
        return -ENOMEM;
    c->sock = sock;
    c->uffd = -1;
    c->pidfd = pidfd;
    c->runs = calloc(n > 0 ? n : 1, sizeof *c->runs);
    void *m = store_len ? mmap(NULL, store_len, PROT_READ, MAP_SHARED, store_fd, 0) : NULL;
    if (!c->runs || m == MAP_FAILED) {
        int e = m == MAP_FAILED ? errno : ENOMEM;
        c->store = NULL;
        c->sock = c->pidfd = -1;         /* the caller still owns them on failure */
        lz_free(c);
        return -e;
    }
    c->store = m;
    c->store_len = store_len;
    for (int i = 0; i < n; i++)
        c->runs[i] = (struct lz_run){ addr[i], len[i], off[i] };
    c->nruns = n;
    pthread_mutex_lock(&mu);
    if (evfd < 0 && (evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0) {
        int e = errno;
        pthread_mutex_unlock(&mu);
        c->sock = c->pidfd = -1;
        lz_free(c);
        return -e;
    }
    c->next = clones;
    clones = c;
    nclones++;
    if (!thread_started) {
        pthread_t t;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&t, &at, thread_main, NULL) == 0)
            thread_started = 1;
        pthread_attr_destroy(&at);
    }
    pthread_mutex_unlock(&mu);
    uint64_t one = 1;
    (void)!write(evfd, &one, sizeof one);
    return thread_started ? 0 : -EAGAIN;
}

/* Serve in the calling thread until every clone has exited. For a process forked to stay
 * behind a detached restore: it has no handler thread, and the lock may have been copied
 * held, so it is made anew. */
int cx_lazy_serve(void)
{
    pthread_mutex_init(&mu, NULL);
    thread_started = 0;
    for (;;) {
        int left = serve_once(-1);
        if (left <= 0)
            return left;
    }
}

/* Wait (up to timeout_ms) until the handler holds the userfaultfd of every clone, i.e. has
 * received what each restorer sent. Before a fork that must take the handler's state along.
 * Returns the number still missing. */
int cx_lazy_sync(int timeout_ms)
{
    for (int waited = 0;; waited++) {
        int missing = 0;
        pthread_mutex_lock(&mu);
        for (struct lz_clone *c = clones; c; c = c->next)
            missing += c->sock >= 0;
        pthread_mutex_unlock(&mu);
        if (!missing || waited >= timeout_ms)
            return missing;
        usleep(1000);
    }
}

void cx_lazy_stats(uint64_t *out3)
{
    pthread_mutex_lock(&mu);
    out3[0] = (uint64_t)nclones;
    out3[1] = total_faults;
    out3[2] = total_copied;
    pthread_mutex_unlock(&mu);
}
