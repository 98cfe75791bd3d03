/* The userfaultfd handler of restored clones: lazy migrate-on-access (moa) and anonymous
 * semantics of the anonymous pages a clone maps from the store (mow, hybrid, lazy moa).
 *
 * A clone's stored anonymous runs are mapped MAP_PRIVATE from the page file (a shmem file), so
 * the kernel treats them as a private file mapping: after MADV_DONTNEED the next touch would
 * map the store's page again (the checkpointed bytes, not zeros), and a range grown with mremap
 * would show the page file's following pages. The restorer registers those runs with a
 * userfaultfd in MINOR mode with the REMOVE, UNMAP, REMAP and FORK events and sends it here
 * over a unix socket (SCM_RIGHTS). Per clone the handler keeps a table of what each address
 * holds: STORE (page file offset) or ZERO. Then:
 *   - a page fault (a page whose PTE is empty though its page is in the store's page cache)
 *     in a STORE entry maps the block of LZ_MAP_BLOCK bytes around it from the page cache with
 *     UFFDIO_CONTINUE (MAP mode: mow, hybrid; the pages stay shared, a write copies) or copies
 *     the LZ_BLOCK bytes around it into private anonymous memory with UFFDIO_COPY (COPY mode:
 *     lazy moa); blocks are clipped to the entry;
 *   - UFFD_EVENT_REMOVE (MADV_DONTNEED, MADV_REMOVE; delivered before the kernel zaps the range)
 *     turns the range into a ZERO entry; a fault there, or at an address the table does not
 *     know (the new part of a range grown in place by mremap), gets the zero page
 *     (UFFDIO_ZEROPAGE, an anonymous zero page in a private mapping; a write copies);
 *   - UFFD_EVENT_UNMAP forgets the range, UFFD_EVENT_REMAP (mremap moving it) moves its
 *     entries, UFFD_EVENT_FORK (the clone forks) gives the child its own copy of the table and
 *     of the userfaultfd; a forked child is forgotten when its memory is gone (probed each
 *     second with a harmless UFFDIO_WRITEPROTECT, which answers ESRCH then).
 * A root clone is forgotten when its pidfd reports its exit.
 *
 * The handler runs in its own pthread (cx_lazy_add starts it) or in the calling thread
 * (cx_lazy_serve, for a process that stays behind a detached restore). If it goes away before
 * a clone, the kernel drops the registration: later faults map the store as a plain private
 * file mapping (lazy moa then simply stops copying; MADV_DONTNEED brings back the checkpoint's
 * bytes again), so the restoring process must outlive its clones or fork a server
 * (cxlfork restore --detach does).
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
#define LZ_MAP_BLOCK ((uint64_t)CX_MAP_BLOCK)
#define ZERO_OFF UINT64_MAX            /* an entry whose pages read as zeros */

struct lz_ent {
    uint64_t addr, len, off;           /* clone address, bytes, page-file offset or ZERO_OFF */
};

struct lz_clone {
    int sock, uffd, pidfd;             /* pidfd -1: a forked child (probed), or dead */
    int copy;                          /* COPY mode (lazy moa) or MAP mode */
    int dead;
    const char *store;                 /* the page file, mapped read-only (COPY mode) */
    uint64_t store_len;
    struct lz_ent *ent;                /* sorted by address, not overlapping */
    int nent, cap;
    struct lz_clone *next;
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct lz_clone *clones;
static int nclones;
static int evfd = -1;
static int thread_started;
static uint64_t st_faults, st_copied, st_mapped, st_zeroed, st_removes, st_remaps, st_forks;

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
    free(c->ent);
    free(c);
}

/* -- the table ----------------------------------------------------------------------------- */
static int ent_reserve(struct lz_clone *c, int more)
{
    if (c->nent + more <= c->cap)
        return 0;
    int cap = c->cap ? c->cap : 16;
    while (cap < c->nent + more)
        cap *= 2;
    struct lz_ent *n = realloc(c->ent, cap * sizeof *n);
    if (!n)
        return -ENOMEM;
    c->ent = n;
    c->cap = cap;
    return 0;
}

/* index of the first entry ending after a */
static int ent_lower(const struct lz_clone *c, uint64_t a)
{
    int lo = 0, hi = c->nent;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (c->ent[mid].addr + c->ent[mid].len <= a)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* forget [s, e): entries overlapping it are cut (one may split in two) */
static int ent_punch(struct lz_clone *c, uint64_t s, uint64_t e)
{
    int i = ent_lower(c, s);
    if (i < c->nent && c->ent[i].addr < s && c->ent[i].addr + c->ent[i].len > e) {
        if (ent_reserve(c, 1) < 0)
            return -ENOMEM;
        struct lz_ent x = c->ent[i];           /* split: [addr, s) and [e, end) */
        memmove(&c->ent[i + 2], &c->ent[i + 1], (c->nent - i - 1) * sizeof x);
        c->nent++;
        c->ent[i].len = s - x.addr;
        c->ent[i + 1] = (struct lz_ent){ e, x.addr + x.len - e,
                                         x.off == ZERO_OFF ? ZERO_OFF : x.off + (e - x.addr) };
        return 0;
    }
    if (i < c->nent && c->ent[i].addr < s) {   /* keep its head */
        c->ent[i].len = s - c->ent[i].addr;
        i++;
    }
    int j = i;
    while (j < c->nent && c->ent[j].addr + c->ent[j].len <= e)
        j++;                                   /* wholly inside: dropped */
    if (j < c->nent && c->ent[j].addr < e) {   /* keep its tail */
        struct lz_ent *x = &c->ent[j];
        uint64_t cut = e - x->addr;
        x->addr = e;
        x->len -= cut;
        if (x->off != ZERO_OFF)
            x->off += cut;
    }
    memmove(&c->ent[i], &c->ent[j], (c->nent - j) * sizeof c->ent[0]);
    c->nent -= j - i;
    return 0;
}

/* add x over whatever was there; neighbouring ZERO entries are merged */
static int ent_put(struct lz_clone *c, struct lz_ent x)
{
    if (ent_punch(c, x.addr, x.addr + x.len) < 0 || ent_reserve(c, 1) < 0)
        return -ENOMEM;
    int i = ent_lower(c, x.addr);
    memmove(&c->ent[i + 1], &c->ent[i], (c->nent - i) * sizeof x);
    c->ent[i] = x;
    c->nent++;
    if (x.off == ZERO_OFF) {
        if (i + 1 < c->nent && c->ent[i + 1].off == ZERO_OFF &&
            c->ent[i + 1].addr == x.addr + x.len) {
            c->ent[i].len += c->ent[i + 1].len;
            memmove(&c->ent[i + 1], &c->ent[i + 2], (c->nent - i - 2) * sizeof x);
            c->nent--;
        }
        if (i > 0 && c->ent[i - 1].off == ZERO_OFF &&
            c->ent[i - 1].addr + c->ent[i - 1].len == c->ent[i].addr) {
            c->ent[i - 1].len += c->ent[i].len;
            memmove(&c->ent[i], &c->ent[i + 1], (c->nent - i - 1) * sizeof x);
            c->nent--;
        }
    }
    return 0;
}

/* mremap moved [from, from+len) to to: move the entries with it */
static int ent_remap(struct lz_clone *c, uint64_t from, uint64_t to, uint64_t len)
{
    int i = ent_lower(c, from), k = 0;
    struct lz_ent *moved = NULL;
    int n = 0;
    for (int j = i; j < c->nent && c->ent[j].addr < from + len; j++)
        n++;
    if (n && !(moved = malloc(n * sizeof *moved)))
        return -ENOMEM;
    for (int j = i; j < c->nent && c->ent[j].addr < from + len; j++) {
        struct lz_ent x = c->ent[j];
        uint64_t s = x.addr > from ? x.addr : from;
        uint64_t e = x.addr + x.len < from + len ? x.addr + x.len : from + len;
        moved[k++] = (struct lz_ent){ s - from + to, e - s,
                                      x.off == ZERO_OFF ? ZERO_OFF : x.off + (s - x.addr) };
    }
    int r = ent_punch(c, from, from + len);
    if (!r)
        r = ent_punch(c, to, to + len);
    for (int j = 0; j < k && !r; j++)
        r = ent_put(c, moved[j]);
    free(moved);
    return r;
}

/* -- faults -------------------------------------------------------------------------------- */
/* ioctl on the clone's userfaultfd; the kernel's count of bytes done is stored in *done */
static long uffd_fill(struct lz_clone *c, int zero, uint64_t dst, uint64_t len, const void *src,
                      int64_t *done)
{
    long r;
    *done = 0;
    if (zero) {
        struct uffdio_zeropage z = { .range = { dst, len }, .mode = 0 };
        r = ioctl(c->uffd, UFFDIO_ZEROPAGE, &z);
        *done = z.zeropage > 0 ? z.zeropage : 0;
    } else if (c->copy) {
        struct uffdio_copy cp = { .dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len };
        r = ioctl(c->uffd, UFFDIO_COPY, &cp);
        *done = cp.copy > 0 ? cp.copy : 0;
    } else {
        struct uffdio_continue co = { .range = { dst, len }, .mode = 0 };
        r = ioctl(c->uffd, UFFDIO_CONTINUE, &co);
        *done = co.mapped > 0 ? co.mapped : 0;
    }
    return r < 0 ? -errno : 0;
}

static void count(struct lz_clone *c, int zero, int64_t bytes)
{
    uint64_t n = (uint64_t)bytes / PAGE;
    if (zero)
        st_zeroed += n;
    else if (c->copy)
        st_copied += n;
    else
        st_mapped += n;
}

/* Resolve one fault; returns -ESRCH when the clone's memory is gone. */
static int serve_fault(struct lz_clone *c, uint64_t addr)
{
    uint64_t page = addr & ~(PAGE - 1);
    uint64_t block = c->copy ? LZ_BLOCK : LZ_MAP_BLOCK;
    uint64_t start = page & ~(block - 1), end = start + block;
    int i = ent_lower(c, page);
    int zero = 1;
    const char *src = NULL;
    st_faults++;
    if (i < c->nent && c->ent[i].addr <= page) {        /* inside entry i */
        const struct lz_ent *x = &c->ent[i];
        if (start < x->addr)
            start = x->addr;
        if (end > x->addr + x->len)
            end = x->addr + x->len;
        zero = x->off == ZERO_OFF;
        if (!zero && c->copy)
            src = c->store + x->off + (start - x->addr);
        if (!zero && c->copy && x->off + (end - x->addr) > c->store_len)
            zero = 1, src = NULL;      /* cannot happen for a checked image */
    } else {                                            /* a gap: zeros up to the neighbours */
        if (i > 0 && c->ent[i - 1].addr + c->ent[i - 1].len > start)
            start = c->ent[i - 1].addr + c->ent[i - 1].len;
        if (i < c->nent && c->ent[i].addr < end)
            end = c->ent[i].addr;
    }
    int64_t n = 0;
    long e = uffd_fill(c, zero, start, end - start, src, &n);
    if (e == -ESRCH)                   /* the clone's memory is gone */
        return -ESRCH;
    count(c, zero, n);
    if (e == 0 || (page >= start && page < start + (uint64_t)n))
        return 0;
    if (e != -EAGAIN) {
        /* the block stopped early (a page in it was mapped already: EEXIST) or reaches out of
         * the mapping (ENOENT: a gap's block is not clipped to the VMA): the faulting page */
        e = uffd_fill(c, zero, page, PAGE, src ? src + (page - start) : NULL, &n);
        if (e == -ESRCH)
            return -ESRCH;
        count(c, zero, n);
        if (e == 0)
            return 0;
    }
    /* EEXIST: mapped meanwhile; EAGAIN: the clone's memory is changing under an event not
     * read yet; ENOENT: not (or no longer) a range of this userfaultfd. Wake the thread: it
     * faults again if the page is still missing. */
    struct uffdio_range wr = { page, PAGE };
    ioctl(c->uffd, UFFDIO_WAKE, &wr);
    return 0;
}

static struct lz_clone *fork_child(struct lz_clone *c, int ufd)
{
    struct lz_clone *k = calloc(1, sizeof *k);
    if (!k)
        return NULL;
    k->sock = -1;
    k->pidfd = -1;
    k->uffd = ufd;
    k->copy = c->copy;
    if (c->store) {        /* a second mapping of the same shared pages */
        void *m = mremap((void *)c->store, 0, c->store_len, MREMAP_MAYMOVE);
        if (m == MAP_FAILED) {
            free(k);
            return NULL;
        }
        k->store = m;
        k->store_len = c->store_len;
    }
    if (c->nent && !(k->ent = malloc(c->nent * sizeof *k->ent))) {
        if (k->store)
            munmap((void *)k->store, k->store_len);
        free(k);
        return NULL;
    }
    if (c->nent)
        memcpy(k->ent, c->ent, c->nent * sizeof *k->ent);
    k->nent = k->cap = c->nent;
    return k;
}

/* Read and handle what the clone's userfaultfd has; 1 when the clone is gone. */
static int serve_uffd(struct lz_clone *c)
{
    struct uffd_msg msg[16];
    int gone = 0;
    for (;;) {
        ssize_t k = read(c->uffd, msg, sizeof msg);
        if (k <= 0)
            return gone;
        for (size_t j = 0; j < (size_t)k / sizeof msg[0]; j++) {
            struct uffd_msg *m = &msg[j];
            switch (m->event) {
            case UFFD_EVENT_PAGEFAULT:
                if (serve_fault(c, m->arg.pagefault.address) == -ESRCH)
                    gone = 1;
                break;
            case UFFD_EVENT_REMOVE:      /* zapped after this read: reads zeros from now on */
                st_removes++;
                ent_put(c, (struct lz_ent){ m->arg.remove.start,
                                            m->arg.remove.end - m->arg.remove.start, ZERO_OFF });
                break;
            case UFFD_EVENT_UNMAP:
                ent_punch(c, m->arg.remove.start, m->arg.remove.end);
                break;
            case UFFD_EVENT_REMAP:
                st_remaps++;
                ent_remap(c, m->arg.remap.from, m->arg.remap.to, m->arg.remap.len);
                break;
            case UFFD_EVENT_FORK: {
                st_forks++;
                struct lz_clone *kid = fork_child(c, (int)m->arg.fork.ufd);
                if (!kid) {
                    close((int)m->arg.fork.ufd);   /* the child runs unregistered */
                    break;
                }
                kid->next = clones;                /* caller holds mu */
                clones = kid;
                nclones++;
                break;
            }
            }
        }
    }
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

/* A forked child's memory is gone when UFFDIO_WRITEPROTECT (no-op here: nothing is registered
 * for write protection, so it fails with ENOENT or EINVAL) answers ESRCH. */
static int child_gone(struct lz_clone *c)
{
    struct uffdio_writeprotect wp = { .range = { PAGE, PAGE }, .mode = 0 };
    return ioctl(c->uffd, UFFDIO_WRITEPROTECT, &wp) < 0 && errno == ESRCH;
}

/* One round: wait for something (up to timeout_ms), handle it. Caller holds no lock. */
static int serve_once(int timeout_ms)
{
    pthread_mutex_lock(&mu);
    int n = 0, cap = 1 + 2 * nclones, kids = 0;
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
        if (c->pidfd >= 0) {
            who[n] = c;
            p[n++] = (struct pollfd){ c->pidfd, POLLIN, 0 };
        } else {
            kids++;
        }
    }
    pthread_mutex_unlock(&mu);
    int r = poll(p, n, kids && (timeout_ms < 0 || timeout_ms > 1000) ? 1000 : timeout_ms);
    pthread_mutex_lock(&mu);
    if (r > 0) {
        if (p[0].revents) {
            uint64_t v;
            (void)!read(evfd, &v, sizeof v);
        }
        for (int i = 1; i < n; i++) {
            struct lz_clone *c = who[i];
            if (!p[i].revents || c->dead)
                continue;
            if (p[i].fd == c->pidfd) {
                c->dead = 1;                           /* the clone exited */
            } else if (p[i].fd == c->sock) {
                int u = recv_uffd(c->sock);
                if (u >= 0) {
                    c->uffd = u;
                    close(c->sock);
                    c->sock = -1;
                } else {
                    c->dead = 1;  /* the restorer died before sending: nothing to serve */
                }
            } else if (serve_uffd(c)) {
                c->dead = 1;
            }
        }
    }
    if (kids)
        for (struct lz_clone *c = clones; c; c = c->next)
            if (c->pidfd < 0 && !c->dead && child_gone(c))
                c->dead = 1;
    for (struct lz_clone **pp = &clones; *pp;) {
        struct lz_clone *c = *pp;
        if (c->dead) {
            *pp = c->next;
            lz_free(c);
            nclones--;
        } else {
            pp = &c->next;
        }
    }
    int left = nclones;
    pthread_mutex_unlock(&mu);
    free(p);
    free(who);
    return r < 0 && errno != EINTR ? -errno : left;
}

static int paused, thread_idle;              /* cx_lazy_pause */
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;

static void *thread_main(void *arg)
{
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&mu);
        while (paused) {
            thread_idle = 1;
            pthread_cond_broadcast(&cv);
            pthread_cond_wait(&cv, &mu);          /* for good: the process is about to exit */
        }
        pthread_mutex_unlock(&mu);
        serve_once(-1);
    }
    return NULL;
}

/* Stop this process's handler thread between two rounds, for good: before a fork whose child
 * takes over (cx_lazy_serve), so that no event is read by the parent after the child's copy
 * of the tables was made (the clones' faults and events wait meanwhile). */
void cx_lazy_pause(void)
{
    pthread_mutex_lock(&mu);
    paused = 1;
    int running = thread_started;
    pthread_mutex_unlock(&mu);
    if (!running)
        return;
    uint64_t one = 1;
    (void)!write(evfd, &one, sizeof one);
    pthread_mutex_lock(&mu);
    while (!thread_idle)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
}

int cx_lazy_add(int sock, int pidfd, int copy, int store_fd, uint64_t store_len, int n,
                const uint64_t *addr, const uint64_t *len, const uint64_t *off)
{
    struct lz_clone *c = calloc(1, sizeof *c);
    if (!c)
        return -ENOMEM;
    c->sock = sock;
    c->uffd = -1;
    c->pidfd = pidfd;
    c->copy = copy;
    void *m = copy && store_len ? mmap(NULL, store_len, PROT_READ, MAP_SHARED, store_fd, 0)
                                : NULL;
    if (m == MAP_FAILED || ent_reserve(c, n > 0 ? n : 1) < 0) {
        int e = m == MAP_FAILED ? errno : ENOMEM;
        c->store = m == MAP_FAILED ? NULL : m;
        c->sock = c->pidfd = -1;         /* the caller still owns them on failure */
        lz_free(c);
        return -e;
    }
    c->store = m;
    c->store_len = m ? store_len : 0;
    for (int i = 0; i < n; i++)
        c->ent[i] = (struct lz_ent){ addr[i], len[i], off[i] };
    c->nent = n;
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
    pthread_cond_init(&cv, NULL);
    thread_started = 0;
    paused = 0;
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

/* clones, faults, pages copied, pages mapped, pages zeroed, removes, remaps, forks */
void cx_lazy_stats(uint64_t *out8)
{
    pthread_mutex_lock(&mu);
    out8[0] = (uint64_t)nclones;
    out8[1] = st_faults;
    out8[2] = st_copied;
    out8[3] = st_mapped;
    out8[4] = st_zeroed;
    out8[5] = st_removes;
    out8[6] = st_remaps;
    out8[7] = st_forks;
    pthread_mutex_unlock(&mu);
}
