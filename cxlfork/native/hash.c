/* cxlfork C helpers: the fast streaming 64-bit hash of the page store's content hash (4
 * lanes, 32-byte rounds), and hashing a range of a file with it. */
#include "cx_internal.h"

#define P1 0x9E3779B185EBCA87ULL
#define P2 0xC2B2AE3D27D4EB4FULL
#define P3 0x165667B19E3779F9ULL
static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

void cx_hash_init(cx_hash_t *s)
{
    s->h[0] = P1 + P2; s->h[1] = P2; s->h[2] = 0; s->h[3] = -P1; s->n = 0;
}

void cx_hash_update(cx_hash_t *s, const void *p, uint64_t len)
{
    const uint64_t *w = p;
    uint64_t a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3];
    uint64_t n = len / 32;
    for (uint64_t i = 0; i < n; i++, w += 4) {
        a = rotl(a + w[0] * P2, 31) * P1;
        b = rotl(b + w[1] * P2, 31) * P1;
        c = rotl(c + w[2] * P2, 31) * P1;
        d = rotl(d + w[3] * P2, 31) * P1;
    }
    s->h[0] = a; s->h[1] = b; s->h[2] = c; s->h[3] = d;
    s->n += n * 32;   /* callers pass page multiples; a tail shorter than 32 B is ignored */
}

uint64_t cx_hash_final(const cx_hash_t *s)
{
    uint64_t h = rotl(s->h[0], 1) + rotl(s->h[1], 7) + rotl(s->h[2], 12) + rotl(s->h[3], 18);
    h ^= s->n;
    h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32;
    return h;
}

uint64_t cx_hash_file(int fd, uint64_t off, uint64_t len)
{
    cx_hash_t s;
    cx_hash_init(&s);
    static const uint64_t CH = 4 << 20;
    char *buf = malloc(CH);
    if (!buf)
        return 0;
    while (len) {
        uint64_t want = len < CH ? len : CH;
        ssize_t r = pread(fd, buf, want, off);
        if (r <= 0) {
            free(buf);
            return 0;
        }
        cx_hash_update(&s, buf, r);
        off += r; len -= r;
    }
    free(buf);
    return cx_hash_final(&s);
}
