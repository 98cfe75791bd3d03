/* MADV_FREE then reuse, and MADV_REMOVE, on anonymous pages filled before the checkpoint, held
 * to plain anonymous memory's behaviour (no allowance for cxlfork's store, unlike anonsem.c):
 *   MADV_FREE returns 0; each page then reads its old bytes or zeros; writes after it stick
 *   (reuse), and a page written then read again keeps the write;
 *   MADV_REMOVE returns -1 with EINVAL (private anonymous memory), contents untouched.
 * Under mow, lazy moa and hybrid the pages are a private mapping of the page store and the
 * kernel answers MADV_FREE with EINVAL and MADV_REMOVE with EACCES before any userfaultfd
 * handler can (docs/cxlfork.md, "Known limits"): this program then prints exactly those two
 * FAIL lines; tests/test_cxlfork_anonfree.py checks that, per policy. */
#include "conform.h"
#include <errno.h>
#include <sys/mman.h>

#define PG 4096UL
#define N 16

static int page_is(const char *p, size_t i, char c)
{
    for (size_t k = 0; k < PG; k++)
        if (p[i * PG + k] != c)
            return 0;
    return 1;
}

int main(void)
{
    char *d = mmap(NULL, N * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *e = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (d == MAP_FAILED || e == MAP_FAILED)
        return 2;
    memset(d, 'D', N * PG);
    memset(e, 'E', 4 * PG);
    ready();
    wait_go();

    errno = 0;
    int r = madvise(d, N * PG, MADV_FREE);
    CHECK(r == 0, "MADV_FREE returned %d errno %d", r, errno);
    for (size_t i = 0; i < N; i++)
        if (!page_is(d, i, 'D') && !page_is(d, i, 0)) {
            CHECK(0, "after MADV_FREE page %zu is neither its old bytes nor zeros", i);
            break;
        }
    for (size_t i = 0; i < N; i += 2)          /* reuse every other page */
        memset(d + i * PG, (char)('a' + i), PG);
    for (size_t i = 0; i < N; i += 2)
        if (!page_is(d, i, (char)('a' + i))) {
            CHECK(0, "write after MADV_FREE to page %zu did not stick", i);
            break;
        }
    for (size_t i = 1; i < N; i += 2)
        if (!page_is(d, i, 'D') && !page_is(d, i, 0)) {
            CHECK(0, "untouched page %zu after reuse is neither its old bytes nor zeros", i);
            break;
        }

    errno = 0;
    r = madvise(e, 4 * PG, MADV_REMOVE);
    CHECK(r == -1 && errno == EINVAL, "MADV_REMOVE returned %d errno %d", r, errno);
    for (size_t i = 0; i < 4; i++)
        if (!page_is(e, i, 'E')) {
            CHECK(0, "MADV_REMOVE changed page %zu", i);
            break;
        }
    return finish();
}
