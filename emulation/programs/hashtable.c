/* A small open-addressing hash table under a skewed (Zipf-like) lookup load: the first real
 * program traced by `tiermem trace` for the policy benchmark. Usage: hashtable KEYS OPS */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

struct slot { uint64_t key; uint64_t val[7]; };   /* 64 bytes: one word per slot */

static uint64_t rng = 88172645463325252ull;
static uint64_t next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }
static uint64_t mix(uint64_t x) { x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33; return x; }

int main(int argc, char **argv) {
    long keys = argc > 1 ? atol(argv[1]) : 100000, ops = argc > 2 ? atol(argv[2]) : 1000000;
    if (keys < 1 || ops < 0) { fprintf(stderr, "usage: hashtable KEYS OPS\n"); return 2; }
    size_t cap = 1; while (cap < (size_t)keys * 2) cap <<= 1;
    struct slot *t = calloc(cap, sizeof *t);
    if (!t) { perror("calloc"); return 1; }
    for (long i = 1; i <= keys; i++) {                 /* insert */
        size_t h = mix(i) & (cap - 1);
        while (t[h].key) h = (h + 1) & (cap - 1);
        t[h].key = i; t[h].val[0] = i * 3;
    }
    uint64_t sum = 0;
    for (long o = 0; o < ops; o++) {                   /* skewed lookups: key ~ keys / u^2 */
        double u = (double)(next() >> 11) / 9007199254740992.0 + 1e-9;
        long k = 1 + (long)((keys - 1) * u * u * u);
        size_t h = mix(k) & (cap - 1);
        while (t[h].key != (uint64_t)k) h = (h + 1) & (cap - 1);
        t[h].val[0] += 1; sum += t[h].val[0];
    }
    printf("%llu\n", (unsigned long long)sum);
    free(t);
    return 0;
}
