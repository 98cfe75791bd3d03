/* A shared file mapping that is read-only but may become writable (the file was opened
 * O_RDWR, then closed): mprotect(PROT_WRITE) must work after restore and its writes reach
 * the file. One from a file opened O_RDONLY must still refuse it (EACCES). */
#include "conform.h"
#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>

int main(int argc, char **argv)
{
    char p1[512], p2[512];
    snprintf(p1, sizeof p1, "%s/rw.bin", argc > 1 ? argv[1] : "/tmp");
    snprintf(p2, sizeof p2, "%s/ro.bin", argc > 1 ? argv[1] : "/tmp");
    int f = open(p1, O_RDWR | O_CREAT | O_TRUNC, 0600);
    (void)!write(f, "shared-file-mapping", 19);
    (void)!ftruncate(f, 4096);
    char *rw = mmap(NULL, 4096, PROT_READ, MAP_SHARED, f, 0);
    close(f);
    int g = open(p2, O_RDWR | O_CREAT | O_TRUNC, 0600);
    (void)!ftruncate(g, 4096);
    close(g);
    g = open(p2, O_RDONLY);
    char *ro = mmap(NULL, 4096, PROT_READ, MAP_SHARED, g, 0);
    close(g);
    ready();
    wait_go();
    CHECK(!memcmp(rw, "shared-file", 11), "mapping content");
    int r = mprotect(rw, 4096, PROT_READ | PROT_WRITE);
    CHECK(r == 0, "mprotect(PROT_WRITE) of the O_RDWR mapping: errno %d", r ? errno : 0);
    if (r == 0) {
        rw[4000] = 'W';
        f = open(p1, O_RDONLY);
        char c = 0;
        CHECK(pread(f, &c, 1, 4000) == 1 && c == 'W', "write reached the file");
        close(f);
    }
    errno = 0;
    CHECK(mprotect(ro, 4096, PROT_READ | PROT_WRITE) < 0 && errno == EACCES,
          "mprotect(PROT_WRITE) of the O_RDONLY mapping: errno %d", errno);
    return finish();
}
