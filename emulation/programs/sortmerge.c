/* Sort-and-probe: builds an array of records, sorts it (qsort), then answers binary-search
 * probes with a moving hot key range. The second real program traced for the policy
 * benchmark. Usage: sortmerge RECORDS PROBES */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

struct rec { uint64_t key; uint64_t pad[3]; };     /* 32 bytes */

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }
static int cmp(const void *a, const void *b) {
    uint64_t x = ((const struct rec *)a)->key, y = ((const struct rec *)b)->key;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 100000, probes = argc > 2 ? atol(argv[2]) : 500000;
    if (n < 2 || probes < 0) { fprintf(stderr, "usage: sortmerge RECORDS PROBES\n"); return 2; }
    struct rec *r = malloc(n * sizeof *r);
    if (!r) { perror("malloc"); return 1; }
    for (long i = 0; i < n; i++) { r[i].key = next() % (uint64_t)(n * 4); r[i].pad[0] = i; }
    qsort(r, n, sizeof *r, cmp);
    uint64_t found = 0;
    for (long p = 0; p < probes; p++) {
        /* the hot range (1/16 of the keys) moves 4 times over the run */
        uint64_t span = (uint64_t)n * 4 / 16, phase = (uint64_t)(p * 4 / (probes ? probes : 1));
        uint64_t key = (phase * span * 3 + next() % span) % (uint64_t)(n * 4);
        long lo = 0, hi = n - 1;
        while (lo < hi) { long mid = (lo + hi) / 2; if (r[mid].key < key) lo = mid + 1; else hi = mid; }
        if (r[lo].key == key) { found++; r[lo].pad[1]++; }
    }
    printf("%llu\n", (unsigned long long)found);
    free(r);
    return 0;
}
