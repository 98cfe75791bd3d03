/* tiermem's C helpers: raw NUMA syscalls, cross-process memory, pagemap reads and the
 * latency / bandwidth microbenchmarks. Everything returns -errno instead of setting errno so
 * the Python side can turn it into one clear error. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include "tiermem_native.h"

#ifndef MPOL_BIND
#define MPOL_BIND 2
#endif
#ifndef MPOL_MF_MOVE
#define MPOL_MF_MOVE (1 << 1)
#endif

static long neg_errno(long r) { return r < 0 ? -errno : r; }

long tm_move_pages(int pid, unsigned long count, const uint64_t *pages,
                   const int *nodes, int *status, int flags)
{
    return neg_errno(syscall(SYS_move_pages, pid, count, (void **)pages, nodes, status, flags));
}

long tm_migrate_pages(int pid, unsigned long maxnode,
                      const unsigned long *old_nodes, const unsigned long *new_nodes)
{
    return neg_errno(syscall(SYS_migrate_pages, pid, maxnode, old_nodes, new_nodes));
}

long tm_mbind(uint64_t addr, uint64_t len, int mode,
              const unsigned long *nodemask, unsigned long maxnode, unsigned int flags)
{
    return neg_errno(syscall(SYS_mbind, (void *)addr, len, mode, nodemask, maxnode, flags));
}

long tm_set_mempolicy(int mode, const unsigned long *nodemask, unsigned long maxnode)
{
    return neg_errno(syscall(SYS_set_mempolicy, mode, nodemask, maxnode));
}

long tm_get_mempolicy(int *mode, unsigned long *nodemask, unsigned long maxnode,
                      uint64_t addr, unsigned long flags)
{
    return neg_errno(syscall(SYS_get_mempolicy, mode, nodemask, maxnode, (void *)addr, flags));
}

int64_t tm_process_vm_readv(int pid, void *local, uint64_t remote, uint64_t len)
{
    struct iovec l = { local, len }, r = { (void *)remote, len };
    return neg_errno(process_vm_readv(pid, &l, 1, &r, 1, 0));
}

int64_t tm_process_vm_writev(int pid, const void *local, uint64_t remote, uint64_t len)
{
    struct iovec l = { (void *)local, len }, r = { (void *)remote, len };
    return neg_errno(process_vm_writev(pid, &l, 1, &r, 1, 0));
}

int64_t tm_pagemap_read_fd(int fd, uint64_t vaddr, uint64_t npages, uint64_t *out)
{
    long psz = sysconf(_SC_PAGESIZE);
    uint64_t done = 0;
    while (done < npages) {
        ssize_t n = pread(fd, out + done, (npages - done) * 8,
                          (off_t)((vaddr / psz + done) * 8));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return done ? (int64_t)done : -errno;
        }
        if (n == 0)
            break;
        done += (uint64_t)n / 8;
    }
    return (int64_t)done;
}

int64_t tm_pagemap_read(int pid, uint64_t vaddr, uint64_t npages, uint64_t *out)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/pagemap", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int64_t r = tm_pagemap_read_fd(fd, vaddr, npages, out);
    close(fd);
    return r;
}

uint64_t tm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void *tm_alloc_on_node(uint64_t size, int node, int hugepages)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    madvise(p, size, hugepages ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    if (node >= 0) {
        unsigned long mask[16] = {0};
        if (node >= (int)(sizeof mask * 8)) {
            munmap(p, size);
            errno = EINVAL;
            return NULL;
        }
        mask[node / (8 * sizeof(unsigned long))] |= 1ul << (node % (8 * sizeof(unsigned long)));
        if (syscall(SYS_mbind, p, size, MPOL_BIND, mask, sizeof mask * 8 + 1, 0) != 0) {
            int e = errno;
            munmap(p, size);
            errno = e;
            return NULL;
        }
    }
    memset(p, 1, size);
    return p;
}

void tm_free(void *p, uint64_t size) { if (p) munmap(p, size); }

/* xorshift64* for a reproducible permutation */
static uint64_t rng_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
    *s = x;
    return x * 2685821657736338717ull;
}

double tm_latency_chase(void *buf, uint64_t size, uint64_t loads, uint64_t seed)
{
    const uint64_t line = 64;
    uint64_t n = size / line;
    if (n < 2 || loads == 0)
        return -1.0;
    uint64_t *order = malloc(n * sizeof *order);
    if (!order)
        return -1.0;
    for (uint64_t i = 0; i < n; i++)
        order[i] = i;
    uint64_t s = seed ? seed : 0x9e3779b97f4a7c15ull;
    for (uint64_t i = n - 1; i > 0; i--) {   /* Fisher-Yates: one random cycle order */
        uint64_t j = rng_next(&s) % (i + 1);
        uint64_t t = order[i]; order[i] = order[j]; order[j] = t;
    }
    char *base = buf;
    for (uint64_t i = 0; i < n; i++)
        *(void **)(base + order[i] * line) = base + order[(i + 1) % n] * line;
    free(order);
    void **p = (void **)base;
    for (uint64_t i = 0; i < n && i < loads; i++)   /* warm the TLB/cache state */
        p = (void **)*p;
    uint64_t t0 = tm_now_ns();
    for (uint64_t i = 0; i < loads; i++)
        p = (void **)*p;
    uint64_t t1 = tm_now_ns();
    __asm__ volatile("" : : "r"(p));
    return (double)(t1 - t0) / (double)loads;
}

double tm_bandwidth_read(void *buf, uint64_t size, int passes)
{
    const uint64_t *w = buf;
    uint64_t n = size / 8, acc0 = 0, acc1 = 0, acc2 = 0, acc3 = 0;
    uint64_t t0 = tm_now_ns();
    for (int p = 0; p < passes; p++)
        for (uint64_t i = 0; i + 3 < n; i += 4) {
            acc0 += w[i]; acc1 += w[i + 1]; acc2 += w[i + 2]; acc3 += w[i + 3];
        }
    uint64_t t1 = tm_now_ns();
    uint64_t acc = acc0 + acc1 + acc2 + acc3;
    __asm__ volatile("" : : "r"(acc));
    return (double)size * passes / ((double)(t1 - t0) / 1e9);
}

double tm_memcpy_rate(void *dst, const void *src, uint64_t size, int passes)
{
    uint64_t t0 = tm_now_ns();
    for (int p = 0; p < passes; p++) {
        memcpy(dst, src, size);
        __asm__ volatile("" : : "r"(dst) : "memory");
    }
    uint64_t t1 = tm_now_ns();
    return (double)size * passes / ((double)(t1 - t0) / 1e9);
}
