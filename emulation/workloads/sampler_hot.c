/* sampler_hot: a workload with a known hot range, for testing access samplers.
 *
 * usage: sampler_hot SIZE_MB NREGIONS HOT_INDEX SECONDS [PASS_US] [COLD_PPM]
 *
 * Maps SIZE_MB of anonymous memory, splits it into NREGIONS equal regions and, every
 * PASS_US microseconds (default 10000), writes one word in every page of region HOT_INDEX
 * and in a random COLD_PPM/1e6 (default 100000, i.e. 10%) of the pages of the other
 * regions, a different subset each pass. So each hot page is accessed 1e6/COLD_PPM (10x)
 * as often as each cold page, and any sampler whose sampling interval is about PASS_US
 * (or longer, up to a few passes) sees the hot region on top. PASS_US 0 = busy loop (for
 * NUMA hinting faults, whose scan window is counted in the task's CPU time: then give a
 * small COLD_PPM so a cold page is rarely touched within one scan window).
 *
 * It prints "mapped base=0x... size=N" first; with SAMPLER_HOT_WAIT set in the environment
 * it then waits for one line on stdin before touching anything (so a sampler can be started
 * before the first-touch faults). After touching everything once it prints:
 *   ready base=0x... size=N hot_start=0x... hot_end=0x... pages=N
 * then runs for SECONDS (0 = until killed), and exits 0.
 *
 * With SAMPLER_HOT_TLB_FLUSH set it flushes its own TLB once per pass (mprotect of a 64-page
 * scratch area: more than the kernel's 33-page ceiling, so a full flush). Samplers that
 * clear page-table accessed bits (DAMON) rely on TLB misses to see them set again; a real
 * CPU's TLB (~1500 entries) cannot hold the hot region, but QEMU TCG's software TLB can, and
 * then DAMON misses most hot accesses (measured: hot pages' mean weight 27-115 without,
 * 330-395 with the flush, cold pages ~20-38 either way).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void *idle_helper(void *arg)
{
    (void)arg;
    for (;;)
        pause();
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: %s SIZE_MB NREGIONS HOT_INDEX SECONDS [PASS_US] [COLD_PPM]\n",
                argv[0]);
        return 2;
    }
    size_t size = (size_t)strtoull(argv[1], NULL, 0) << 20;
    long nreg = strtol(argv[2], NULL, 0), hot = strtol(argv[3], NULL, 0);
    double secs = strtod(argv[4], NULL);
    long pass_us = argc > 5 ? strtol(argv[5], NULL, 0) : 10000;
    long ppm = argc > 6 ? strtol(argv[6], NULL, 0) : 100000;
    long psz = sysconf(_SC_PAGESIZE);
    if (size == 0 || nreg < 1 || hot < 0 || hot >= nreg || pass_us < 0 || ppm < 0 ||
        ppm > 1000000) {
        fprintf(stderr, "sampler_hot: bad arguments\n");
        return 2;
    }
    size_t npages = size / psz, per = npages / nreg;
    pthread_t helper;
    if (pthread_create(&helper, NULL, idle_helper, NULL) != 0) {
        fprintf(stderr, "sampler_hot: cannot start the helper thread\n");
        return 1;
    }
    char *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        perror("sampler_hot: mmap");
        return 1;
    }
    madvise(base, size, MADV_NOHUGEPAGE);   /* 4 KiB pages: page-level ground truth */
    printf("mapped base=%p size=%zu\n", (void *)base, size);
    fflush(stdout);
    if (getenv("SAMPLER_HOT_WAIT")) {
        char line[16];
        if (!fgets(line, sizeof line, stdin))
            return 1;
    }
    for (size_t i = 0; i < npages; i++)
        base[i * psz] = 1;
    size_t hs = hot * per, he = hs + per;
    printf("ready base=%p size=%zu hot_start=%p hot_end=%p pages=%zu\n", (void *)base, size,
           (void *)(base + hs * psz), (void *)(base + he * psz), npages);
    fflush(stdout);

    /* SAMPLER_HOT_TLB_FLUSH: flush this process's TLB once per pass (see the header) */
    char *scratch = NULL;
    if (getenv("SAMPLER_HOT_TLB_FLUSH")) {
        scratch = mmap(NULL, 64 * psz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                       -1, 0);
        if (scratch == MAP_FAILED) {
            perror("sampler_hot: mmap");
            return 1;
        }
    }
    uint64_t x = 88172645463325252ULL;
    double t_end = now() + secs, next = now();
    while (secs <= 0 || now() < t_end) {
        for (size_t i = hs; i < he; i++)
            base[i * psz]++;
        for (size_t i = 0; i < npages; i++) {
            if (i >= hs && i < he)
                continue;
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            if ((long)(x % 1000000) < ppm)
                base[i * psz]++;
        }
        if (scratch) {
            for (int i = 0; i < 64; i++)
                scratch[i * psz] = 1;
            mprotect(scratch, 64 * psz, PROT_READ);     /* > 33 pages: a full flush */
            mprotect(scratch, 64 * psz, PROT_READ | PROT_WRITE);
        }
        next += pass_us * 1e-6;
        double d = next - now();
        if (d > 0)
            usleep((useconds_t)(d * 1e6));
        else
            next = now();
    }
    return 0;
}
