/* Anonymous semantics over PMD-mapped store blocks (docs/cxlfork.md, "Huge store pages"): a
 * 2 MiB-aligned 12 MiB anonymous state filled before the checkpoint (a pattern per page). In a
 * mow clone whose store has 2 MiB folios the aligned blocks come back mapped with PMDs
 * (checked with the argument "pmd": ShmemPmdMapped of the mapping), and then, exactly as on anonymous memory (the
 * original, run on after the checkpoint, is the reference):
 *   every page reads its pattern;
 *   MADV_DONTNEED of one page inside a block gives zeros there and keeps its neighbours;
 *   a write inside a block sticks and changes nothing else;
 *   MADV_DONTNEED of a whole block gives zeros;
 *   mremap moving a whole block keeps its bytes, and MADV_DONTNEED at the new place zeroes;
 *   a forked child's MADV_DONTNEED of a block gives it zeros, the parent keeps its bytes.
 * Each check names the page it found wrong. */
#include "conform.h"
#include <errno.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/wait.h>

#define PG 4096UL
#define HUGE (2UL << 20)
#define BLK (HUGE / PG)
#define NBLK 6

static char pat(size_t i) { return (char)(1 + i % 251); }

static long first_bad(const char *p, size_t from, size_t to, int zero)
{
    for (size_t i = from; i < to; i++)
        for (size_t k = 0; k < PG; k += 512)
            if (p[i * PG + k] != (zero ? 0 : pat(i)))
                return (long)i;
    return -1;
}

/* kB of the mapping holding p that are PMD-mapped shmem (cxlfork's store); -1: not a store
 * mapping */
static long pmd_kb(const void *p)
{
    char line[512];
    unsigned long lo, hi, a = (unsigned long)p;
    long kb = -1;
    int in = 0, store = 0;
    FILE *f = fopen("/proc/self/smaps", "r");
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "%lx-%lx", &lo, &hi) == 2) {
            in = lo <= a && a < hi;
            store = in && strstr(line, ".pages\n") != NULL;
        } else if (in && store && sscanf(line, "ShmemPmdMapped: %ld kB", &kb) == 1) {
            break;
        }
    }
    fclose(f);
    return store ? kb : -1;
}

int main(int argc, char **argv)
{
    int want_pmd = argc > 1 && !strcmp(argv[1], "pmd");
    char *r = mmap(NULL, (NBLK + 1) * HUGE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r == MAP_FAILED) {
        perror("mmap");
        return 2;
    }
    char *p = (char *)(((uintptr_t)r + HUGE - 1) & ~(HUGE - 1));
    for (size_t i = 0; i < NBLK * BLK; i++)
        memset(p + i * PG, pat(i), PG);
    ready();
    wait_go();
    long bad, kb = pmd_kb(p);
    CHECK(!want_pmd || kb < 0 || kb >= (long)(NBLK * HUGE / 1024), "store mapping: only %ld kB "
          "PMD-mapped of %lu kB", kb, NBLK * HUGE / 1024);
    CHECK((bad = first_bad(p, 0, NBLK * BLK, 0)) < 0, "page %ld lost its bytes", bad);

    /* block 0: one page dropped inside it */
    CHECK(madvise(p + 7 * PG, PG, MADV_DONTNEED) == 0, "MADV_DONTNEED: errno %d", errno);
    CHECK(first_bad(p, 7, 8, 1) < 0, "page 7 not zeros after MADV_DONTNEED");
    CHECK((bad = first_bad(p, 0, 7, 0)) < 0 && (bad = first_bad(p, 8, BLK, 0)) < 0,
          "block 0: page %ld changed by a MADV_DONTNEED of page 7", bad);
    /* block 1: one write */
    p[BLK * PG + 3 * PG + 5] = 'W';
    CHECK(p[BLK * PG + 3 * PG + 5] == 'W', "write in block 1 did not stick");
    p[BLK * PG + 3 * PG + 5] = pat(BLK + 3);
    CHECK((bad = first_bad(p, BLK, 2 * BLK, 0)) < 0, "block 1: page %ld changed", bad);
    /* block 2: dropped whole */
    CHECK(madvise(p + 2 * HUGE, HUGE, MADV_DONTNEED) == 0, "MADV_DONTNEED block: errno %d",
          errno);
    CHECK((bad = first_bad(p, 2 * BLK, 3 * BLK, 1)) < 0, "block 2: page %ld not zeros", bad);
    /* block 3: moved to a new 2 MiB-aligned place (then dropped there) */
    char *dst = mmap(NULL, 2 * HUGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    dst = (char *)(((uintptr_t)dst + HUGE - 1) & ~(HUGE - 1));
    char *m = mremap(p + 3 * HUGE, HUGE, HUGE, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
    CHECK(m == dst, "mremap: errno %d", errno);
    if (m == dst) {
        for (size_t i = 0; i < BLK; i++)
            if (m[i * PG] != pat(3 * BLK + i) || m[i * PG + PG - 1] != pat(3 * BLK + i)) {
                CHECK(0, "moved block: page %zu lost its bytes", i);
                break;
            }
        CHECK(madvise(m, HUGE, MADV_DONTNEED) == 0, "MADV_DONTNEED moved: errno %d", errno);
        CHECK(first_bad(m, 0, BLK, 1) < 0, "moved block not zeros after MADV_DONTNEED");
    }
    /* block 4: a forked child drops it; the parent keeps it */
    fflush(stdout);
    pid_t c = fork();
    if (c == 0) {
        int ok = madvise(p + 4 * HUGE, HUGE, MADV_DONTNEED) == 0 &&
                 first_bad(p, 4 * BLK, 5 * BLK, 1) < 0 && first_bad(p, 5 * BLK, 6 * BLK, 0) < 0;
        _exit(ok ? 0 : 1);
    }
    int st = 0;
    waitpid(c, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "forked child: block 4 not zeros after "
          "MADV_DONTNEED, or block 5 changed (status %#x)", st);
    CHECK((bad = first_bad(p, 4 * BLK, 6 * BLK, 0)) < 0, "parent: page %ld changed by the "
          "child's MADV_DONTNEED", bad);
    return finish();
}
