/* Memory: heap, large anonymous (half touched), guard page, read-only, shared anonymous,
 * private file mapping with copied-on-write pages, THP region, .data/.bss, stack. */
#include "conform.h"
#include <fcntl.h>
#include <stdint.h>
#include <sys/mman.h>

static uint64_t data_words[1024] = { 1, 2, 3 };
static uint64_t bss_words[4096];

static uint64_t pat(uint64_t i, uint64_t salt) { return i * 0x9E3779B97F4A7C15ULL ^ salt; }

static int maps_has(void *addr, const char *perms)
{
    char line[512], want[32];
    snprintf(want, sizeof want, "%lx-", (unsigned long)addr);
    FILE *f = fopen("/proc/self/maps", "r");
    int found = 0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, want, strlen(want)) && strstr(line, perms))
            found = 1;
    fclose(f);
    return found;
}

int main(void)
{
    const size_t big = 32 << 20, page = 4096;
    uint64_t *heap = malloc(4 << 20);
    for (size_t i = 0; i < (4 << 20) / 8; i++) heap[i] = pat(i, 1);
    char *anon = mmap(NULL, big, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (size_t off = 0; off < big; off += 2 * page) anon[off + 7] = (char)(off >> 13);
    char *guard = mmap(NULL, 3 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(guard, 0x5a, 3 * page);
    mprotect(guard + page, page, PROT_NONE);
    char *ro = mmap(NULL, 4 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(ro, 0x33, 4 * page);
    mprotect(ro, 4 * page, PROT_READ);
    uint64_t *shared = mmap(NULL, 8 * page, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    for (size_t i = 0; i < 8 * page / 8; i += 3) shared[i] = pat(i, 2);
    char path[] = "cxlfork-mem-XXXXXX";   /* in the cwd: the test directory */
    int fd = mkstemp(path);
    char buf[4 * 4096];
    memset(buf, 'F', sizeof buf);
    (void)!write(fd, buf, sizeof buf);
    char *fmap = mmap(NULL, sizeof buf, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    fmap[4096 + 5] = 'C';                  /* one page copied-on-write */
    close(fd);
    char *thp = mmap(NULL, 8 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *thp_al = (char *)(((uintptr_t)thp + (2 << 20) - 1) & ~((uintptr_t)(2 << 20) - 1));
    madvise(thp_al, 4 << 20, MADV_HUGEPAGE);
    memset(thp_al, 0x77, 4 << 20);
    for (int i = 0; i < 4096; i++) bss_words[i] = pat(i, 3);
    data_words[1000] = 42;
    volatile uint64_t stack_arr[2048];
    for (int i = 0; i < 2048; i++) stack_arr[i] = pat(i, 4);

    ready();
    wait_go();

    for (size_t i = 0; i < (4 << 20) / 8; i++)
        if (heap[i] != pat(i, 1)) { CHECK(0, "heap word %zu", i); break; }
    for (size_t off = 0; off < big; off += page) {
        char want = (off / page) % 2 ? 0 : (char)(off >> 13);
        if (anon[off + 7] != want || anon[off] != 0) { CHECK(0, "anon page at %zu", off); break; }
    }
    CHECK(guard[0] == 0x5a && guard[2 * page] == 0x5a, "guard neighbours");
    CHECK(maps_has(guard + page, "---p"), "guard page lost PROT_NONE");
    CHECK(maps_has(ro, "r--p"), "read-only mapping lost its protection");
    CHECK(ro[4 * page - 1] == 0x33, "read-only contents");
    for (size_t i = 0; i < 8 * page / 8; i++)
        if (shared[i] != (i % 3 ? 0 : pat(i, 2))) { CHECK(0, "shared word %zu", i); break; }
    CHECK(fmap[0] == 'F' && fmap[4096 + 5] == 'C' && fmap[4096 + 6] == 'F', "file mapping");
    fmap[0] = 'W';                          /* private: the file must not change */
    fd = open(path, O_RDONLY);
    char c = 0;
    CHECK(pread(fd, &c, 1, 0) == 1 && c == 'F', "private write reached the file");
    close(fd);
    for (size_t i = 0; i < (4 << 20); i += 4096) if (thp_al[i] != 0x77) { CHECK(0, "thp"); break; }
    for (int i = 0; i < 4096; i++) if (bss_words[i] != pat(i, 3)) { CHECK(0, "bss %d", i); break; }
    CHECK(data_words[0] == 1 && data_words[2] == 3 && data_words[1000] == 42, ".data");
    for (int i = 0; i < 2048; i++) if (stack_arr[i] != pat(i, 4)) { CHECK(0, "stack %d", i); break; }
    /* writes work everywhere (copy-on-write from the store) */
    memset(heap, 1, 4 << 20);
    memset(anon, 2, big);
    shared[1] = 9;
    CHECK(heap[7] == 0x0101010101010101ULL && anon[big - 1] == 2 && shared[1] == 9, "writes");
    /* the heap can grow */
    void *more = malloc(64 << 20);
    CHECK(more != NULL, "malloc after restore");
    memset(more, 3, 64 << 20);
    return finish();
}
