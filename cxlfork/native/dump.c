/* cxlfork C helpers: the page dump of a checkpoint: runs of a process's memory read
 * (process_vm_readv, or pread of /proc/PID/mem or a shmem object) into the page file,
 * hashed on the way; mbind of the page file to the store node. */
#include "cx_internal.h"
#include <sys/ioctl.h>

#define BATCH_BYTES ((uint64_t)CX_DUMP_BATCH)
#define MAX_IOV 1024

/* Copy the runs (addr[i], len[i]) of PID's memory (process_vm_readv, or pread of memfd when
 * >= 0: /proc/PID/mem or a shmem object) into the page file, hashing on the way. With outfd
 * < 0 they go to dst (a mapping of the page file); with outfd >= 0 each 1 MiB batch is read
 * into dst (a bounce buffer of BATCH_BYTES, kept in cache), hashed and pwritten to outfd at
 * out_off onwards: tmpfs allocates full-page writes without zeroing them first, and there is
 * no page fault per page of the mapping. */
int64_t cx_dump_runs(int pid, int memfd, int n, const uint64_t *addr, const uint64_t *len,
                     void *dst, cx_hash_t *h, int outfd, uint64_t out_off)
{
    char *out = dst;
    char *bounce = dst;
    uint64_t total = 0;
    int i = 0;
    uint64_t done_in_run = 0;
    struct iovec remote[MAX_IOV];
    while (i < n) {
        /* gather up to BATCH_BYTES of runs (splitting a long run) */
        int k = 0;
        uint64_t batch = 0;
        int j = i;
        uint64_t d = done_in_run;
        while (j < n && k < MAX_IOV && batch < BATCH_BYTES) {
            uint64_t left = len[j] - d;
            uint64_t take = left < BATCH_BYTES - batch ? left : BATCH_BYTES - batch;
            remote[k].iov_base = (void *)(uintptr_t)(addr[j] + d);
            remote[k].iov_len = take;
            k++;
            batch += take;
            d += take;
            if (d == len[j]) {
                j++;
                d = 0;
            }
        }
        uint64_t got = 0;
        char *at = outfd >= 0 ? bounce : out + total;   /* where this batch goes */
        if (memfd < 0) {
            struct iovec local = { at, batch };
            while (got < batch) {
                /* on a partial read, skip the iovecs already done */
                int first = 0;
                uint64_t skip = got;
                while (skip >= remote[first].iov_len) {
                    skip -= remote[first].iov_len;
                    first++;
                }
                remote[first].iov_base = (char *)remote[first].iov_base + skip;
                remote[first].iov_len -= skip;
                local.iov_base = at + got;
                local.iov_len = batch - got;
                ssize_t r = syscall(SYS_process_vm_readv, pid, &local, 1, &remote[first],
                                    k - first, 0);
                if (r < 0)
                    return -errno;
                if (r == 0)
                    return -EFAULT;
                got += r;
            }
        } else {
            for (int q = 0; q < k; q++) {
                uint64_t o = 0;
                while (o < remote[q].iov_len) {
                    ssize_t r = pread(memfd, at + got, remote[q].iov_len - o,
                                      (off_t)(uintptr_t)remote[q].iov_base + o);
                    if (r < 0)
                        return -errno;
                    if (r == 0) {          /* end of a file object: the tail page is zero */
                        memset(at + got, 0, remote[q].iov_len - o);
                        got += remote[q].iov_len - o;
                        break;
                    }
                    o += r;
                    got += r;
                }
            }
        }
        cx_hash_update(h, at, batch);
        if (outfd >= 0) {
            uint64_t w = 0;
            while (w < batch) {
                ssize_t r = pwrite(outfd, at + w, batch - w, (off_t)(out_off + total + w));
                if (r < 0)
                    return -errno;
                w += r;
            }
        }
        total += batch;
        i = j;
        done_in_run = d;
    }
    return (int64_t)total;
}

int cx_mbind_shared(void *addr, uint64_t len, int node)
{
    unsigned long mask[16] = { 0 };
    if (node < 0 || node >= 1024)
        return -EINVAL;
    mask[node / 64] = 1UL << (node % 64);
    if (syscall(SYS_mbind, addr, len, 2 /* MPOL_BIND */, mask, 1025, 0) < 0)
        return -errno;
    return 0;
}

/* PAGEMAP_SCAN (Linux 6.7+): the kernel walks the page tables and returns ranges of pages by
 * category, instead of 8 bytes of /proc/PID/pagemap per page. Defined here: the build's
 * kernel headers may predate it. */
#ifndef PAGEMAP_SCAN
struct page_region { uint64_t start, end, categories; };
struct pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PAGE_IS_FILE    (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
#endif
#define PM_PRESENT_BIT (1ULL << 63)
#define PM_SWAP_BIT    (1ULL << 62)
#define PM_FILE_BIT    (1ULL << 61)
#define SCAN_VEC 256

static int64_t add_run(uint64_t *out, int64_t n, int64_t cap, uint64_t a, uint64_t b)
{
    if (n > 0 && out[2 * (n - 1)] + out[2 * (n - 1) + 1] * 4096 == a) {
        out[2 * (n - 1) + 1] += (b - a) / 4096;         /* adjacent: merge */
        return n;
    }
    if (n >= cap)
        return -ENOSPC;
    out[2 * n] = a;
    out[2 * n + 1] = (b - a) / 4096;
    return n + 1;
}

/* Runs (out[2i] = first address, out[2i+1] = pages) of the pages of [start, end) that hold
 * process-private data: present or swapped, and with file_ok == 0 not file pages (the
 * copied-on-write pages of a private file mapping). pmfd: /proc/PID/pagemap. Returns the
 * number of runs, -ENOSPC when more than cap, or -errno. PAGEMAP_SCAN where the kernel has
 * it, else /proc/PID/pagemap read in chunks. */
int64_t cx_present_runs(int pmfd, uint64_t start, uint64_t end, int file_ok, uint64_t *out,
                        int64_t cap)
{
    int64_t n = 0;
    struct page_region vec[SCAN_VEC];
    struct pm_scan_arg a;
    memset(&a, 0, sizeof a);
    a.size = sizeof a;
    a.start = start;
    a.end = end;
    a.vec = (uintptr_t)vec;
    a.vec_len = SCAN_VEC;
    a.category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
    if (!file_ok) {                    /* required: not a file page */
        a.category_mask = PAGE_IS_FILE;
        a.category_inverted = PAGE_IS_FILE;
    }
    a.return_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_FILE;
    while (a.start < end) {
        long r = ioctl(pmfd, PAGEMAP_SCAN, &a);
        if (r < 0) {
            if ((errno == ENOTTY || errno == EINVAL) && n == 0 && a.start == start)
                goto by_pagemap;
            return -errno;
        }
        for (long i = 0; i < r; i++)
            if ((n = add_run(out, n, cap, vec[i].start, vec[i].end)) < 0)
                return n;
        if (a.walk_end <= a.start)
            return -EIO;
        a.start = a.walk_end;
    }
    return n;

by_pagemap:;
    enum { CH = 4096 };
    static __thread uint64_t pm[CH];
    uint64_t run0 = 0;
    int in = 0;
    for (uint64_t va = start; va < end;) {
        uint64_t k = (end - va) / 4096;
        if (k > CH)
            k = CH;
        ssize_t r = pread(pmfd, pm, k * 8, (off_t)(va / 4096 * 8));
        if (r < 0)
            return -errno;
        if (r == 0)
            return -EIO;
        k = (uint64_t)r / 8;
        for (uint64_t i = 0; i < k; i++, va += 4096) {
            uint64_t e = pm[i];
            int take = (e & (PM_PRESENT_BIT | PM_SWAP_BIT)) && (file_ok || !(e & PM_FILE_BIT));
            if (take && !in) {
                run0 = va;
                in = 1;
            } else if (!take && in) {
                if ((n = add_run(out, n, cap, run0, va)) < 0)
                    return n;
                in = 0;
            }
        }
    }
    if (in && (n = add_run(out, n, cap, run0, end)) < 0)
        return n;
    return n;
}
