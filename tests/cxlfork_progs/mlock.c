/* mlock()ed memory (issue 13): a 16-page region locked with mlock() and filled, a 16-page region
 * locked with mlock2(MLOCK_ONFAULT) with one page touched, then mlockall(MCL_FUTURE) (argv[1]
 * "onfault": MCL_FUTURE | MCL_ONFAULT). After the restore each region is still locked as it
 * was (VmFlags lo, and lf for on-fault), the mlock()ed one keeps its bytes and is resident, the
 * process's VmLck covers both, a new mapping is locked (MCL_FUTURE still on, with MCL_ONFAULT
 * as it was), and munlock works. */
#include "conform.h"
#include <errno.h>
#include <sys/mman.h>

#define PG 4096UL
#define N 16

/* "lo"/"lf" in the VmFlags of the mapping holding p: bit 0 locked, bit 1 on fault */
static int lock_flags(const void *p)
{
    char line[512];
    unsigned long lo, hi, a = (unsigned long)p;
    int in = 0, out = -1;
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2)
            in = lo <= a && a < hi;
        else if (in && strncmp(line, "VmFlags:", 8) == 0) {
            out = (strstr(line, " lo") ? 1 : 0) | (strstr(line, " lf") ? 2 : 0);
            break;
        }
    }
    fclose(f);
    return out;
}

static long vmlck_kb(void)
{
    char line[256];
    long kb = -1;
    FILE *f = fopen("/proc/self/status", "r");
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmLck: %ld kB", &kb) == 1)
            break;
    if (f)
        fclose(f);
    return kb;
}

static int resident(const char *p, size_t pages)
{
    unsigned char v[N];
    if (mincore((void *)p, pages * PG, v) != 0)
        return 0;
    for (size_t i = 0; i < pages; i++)
        if (!(v[i] & 1))
            return 0;
    return 1;
}

int main(int argc, char **argv)
{
    int onfault = argc > 1 && strcmp(argv[1], "onfault") == 0;
    char *a = mmap(NULL, N * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *b = mmap(NULL, N * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED || b == MAP_FAILED)
        return 2;
    memset(a, 'L', N * PG);
    if (mlock(a, N * PG) != 0 || syscall(325 /* mlock2 */, b, N * PG, 1 /* MLOCK_ONFAULT */)) {
        perror("mlock");
        return 2;
    }
    b[0] = 'b';
    if (mlockall(MCL_FUTURE | (onfault ? MCL_ONFAULT : 0)) != 0) {
        perror("mlockall");
        return 2;
    }
    ready();
    wait_go();
    int fa = lock_flags(a), fb = lock_flags(b);
    CHECK(fa == 1, "mlock()ed region: lock flags %d (want lo, not lf)", fa);
    CHECK(fb == 3, "MLOCK_ONFAULT region: lock flags %d (want lo and lf)", fb);
    int bad = 0;
    for (size_t i = 0; i < N * PG; i++)
        bad += a[i] != 'L';
    CHECK(!bad, "mlock()ed region: %d bytes changed", bad);
    CHECK(b[0] == 'b', "MLOCK_ONFAULT region lost its byte");
    CHECK(resident(a, N), "mlock()ed region is not all resident");
    long kb = vmlck_kb();
    CHECK(kb >= (long)(2 * N * PG / 1024), "VmLck %ld kB, want at least %lu", kb,
          2 * N * PG / 1024);
    char *c = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(c != MAP_FAILED, "mmap after restore: errno %d", errno);
    if (c != MAP_FAILED) {
        int fc = lock_flags(c);
        CHECK(fc == (onfault ? 3 : 1), "a new mapping: lock flags %d (MCL_FUTURE%s lost)", fc,
              onfault ? "|MCL_ONFAULT" : "");
    }
    CHECK(munlock(a, N * PG) == 0 && lock_flags(a) == 0, "munlock: errno %d", errno);
    return finish();
}
