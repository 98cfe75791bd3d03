/* cxlfork C helpers: the page dump of a checkpoint: runs of a process's memory read
 * (process_vm_readv, or pread of /proc/PID/mem or a shmem object) into the page file,
 * hashed on the way; mbind of the page file to the store node. */
#include "cx_internal.h"

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
