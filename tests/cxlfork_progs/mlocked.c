/* mlock()ed memory survives, locked: an anonymous region filled before the checkpoint and a
 * read-only shared mapping of a file (as llama.cpp locks its model), both mlock()ed, and a
 * region never locked. After go: the contents are right, both locked regions are VM_LOCKED
 * ("lo" in their smaps VmFlags; the clone locks them on fault), the other is not, and pages
 * touched after go count in VmLck. argv[1]: a file to map (default: this program), its whole
 * pages. */
#include "conform.h"
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define ANON (2UL << 20)

static int locked(void *addr)
{
    char want[32], line[512];
    snprintf(want, sizeof want, "%lx-", (unsigned long)addr);
    FILE *f = fopen("/proc/self/smaps", "r");
    int in = 0, r = -1;
    while (f && fgets(line, sizeof line, f)) {
        if (!strncmp(line, want, strlen(want)))
            in = 1;
        else if (in && !strncmp(line, "VmFlags:", 8)) {
            r = strstr(line, " lo") != NULL;
            break;
        }
    }
    if (f)
        fclose(f);
    return r;
}

static long vmlck_kb(void)
{
    char line[256];
    long kb = -1;
    FILE *f = fopen("/proc/self/status", "r");
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmLck:", 6))
            kb = atol(line + 6);
    if (f)
        fclose(f);
    return kb;
}

int main(int argc, char **argv)
{
    unsigned char *a = mmap(NULL, ANON, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                            -1, 0);
    unsigned char *u = mmap(NULL, ANON, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                            -1, 0);
    int fd = open(argc > 1 ? argv[1] : "/proc/self/exe", O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) || st.st_size < 4096)
        return 2;
    size_t flen = st.st_size & ~4095UL;
    unsigned char *m = mmap(NULL, flen, PROT_READ, MAP_SHARED, fd, 0);
    if (a == MAP_FAILED || u == MAP_FAILED || m == MAP_FAILED)
        return 2;
    for (unsigned long i = 0; i < ANON; i++)
        a[i] = u[i] = (unsigned char)(i * 31 + 7);
    unsigned char head[16];
    memcpy(head, m, sizeof head);
    if (mlock(a, ANON) || mlock(m, flen))
        return 3;
    CHECK(locked(a) == 1 && locked(m) == 1 && locked(u) == 0, "before: locked %d %d %d",
          locked(a), locked(m), locked(u));
    ready();
    wait_go();
    CHECK(locked(a) == 1, "anonymous region not locked (%d)", locked(a));
    CHECK(locked(m) == 1, "file mapping not locked (%d)", locked(m));
    CHECK(locked(u) == 0, "unlocked region locked (%d)", locked(u));
    unsigned long bad = 0;
    for (unsigned long i = 0; i < ANON; i++)
        bad += a[i] != (unsigned char)(i * 31 + 7) || u[i] != (unsigned char)(i * 31 + 7);
    CHECK(!bad, "%lu bytes wrong", bad);
    CHECK(!memcmp(head, m, sizeof head), "file mapping contents");
    for (unsigned long i = 0; i < ANON; i += 4096)
        a[i] ^= 1;                               /* every page touched (written) */
    long kb = vmlck_kb();
    CHECK(kb >= (long)(ANON >> 10), "VmLck %ld kB < the anonymous region", kb);
    /* unlocked, the region may merge with its neighbour (then no VMA starts at a) */
    CHECK(munlock(a, ANON) == 0 && locked(a) != 1, "munlock");
    return finish();
}
