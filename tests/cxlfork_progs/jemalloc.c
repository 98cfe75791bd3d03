/* A real allocator over restored anonymous memory (run with LD_PRELOAD=libjemalloc.so.2):
 * before the checkpoint a large block is filled and freed (jemalloc keeps the dirty extent);
 * after restore the arenas are purged (mallctl "arena.<all>.purge": MADV_DONTNEED, after
 * which jemalloc counts the pages as zeroed) and calloc of the same size, served from that
 * extent without a memset, must read zeros. On a clone whose dropped pages came back with
 * the checkpoint's bytes, calloc returned 'J's. */
#include "conform.h"
#include <dlfcn.h>
#include <stdint.h>

#define SZ (32UL << 20)

typedef int (*mallctl_t)(const char *, void *, size_t *, void *, size_t);

int main(void)
{
    mallctl_t mallctl = (mallctl_t)dlsym(RTLD_DEFAULT, "mallctl");
    if (!mallctl) {
        (void)!write(1, "FAIL: not running under jemalloc (LD_PRELOAD)\n", 46);
        return 1;
    }
    char *p = malloc(SZ);
    volatile uintptr_t where = (uintptr_t)p;
    memset(p, 'J', SZ);
    free(p);                       /* dirty: kept by jemalloc, its pages stay present */

    ready();
    wait_go();

    /* 4096 = MALLCTL_ARENAS_ALL */
    CHECK(mallctl("arena.4096.purge", NULL, NULL, NULL, 0) == 0, "mallctl purge");
    char *q = calloc(1, SZ);
    CHECK(q != NULL, "calloc");
    size_t bad = SZ;
    for (size_t i = 0; i < SZ; i += 512)
        if (q[i]) {
            bad = i;
            break;
        }
    CHECK(bad == SZ, "calloc returned non-zero byte %#x at offset %zu (block %s the freed one)",
          (unsigned char)q[bad < SZ ? bad : 0], bad,
          (uintptr_t)q == where ? "reuses" : "is not");
    memset(q, 'Q', SZ);
    CHECK(q[SZ - 1] == 'Q', "write after calloc");
    return finish();
}
