/* Mappings of deleted files: a POSIX shared memory object (shm_open, ftruncate, MAP_SHARED,
 * then shm_unlink) whose fd stays open, and a file in the scratch directory mapped
 * MAP_PRIVATE with one page written (copied on write), then deleted and its fd closed.
 * After restore: the shared mapping and the fd are one file (a store through the mapping is
 * read through the fd and back), the private mapping has the file's pages and its own copy.
 * argv[1]: a scratch directory. */
#include "conform.h"
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    char name[64], path[512];
    snprintf(name, sizeof name, "/cxlfork-deletedmap-%d", getpid());
    int sfd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    CHECK(sfd >= 0 && ftruncate(sfd, 3 * 4096) == 0, "shm_open");
    char *sh = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
    strcpy(sh, "shared page 0");
    strcpy(sh + 8192, "shared page 2");
    shm_unlink(name);
    snprintf(path, sizeof path, "%s/mapped", argv[1]);
    int f = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    char page[4096];
    for (int i = 0; i < 2; i++) {
        memset(page, 'A' + i, sizeof page);
        (void)!write(f, page, sizeof page);
    }
    char *pr = mmap(NULL, 2 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, f, 0);
    pr[4096] = 'z';                               /* page 1 copied on write */
    close(f);
    unlink(path);
    ready();
    wait_go();
    CHECK(!strcmp(sh, "shared page 0") && !strcmp(sh + 8192, "shared page 2"),
          "shared mapping: '%s' '%s'", sh, sh + 8192);
    char b[32] = { 0 };
    CHECK(pread(sfd, b, 13, 8192) == 13 && !strcmp(b, "shared page 2"), "fd: '%s'", b);
    strcpy(sh + 4096, "written later");
    CHECK(pread(sfd, b, 13, 4096) == 13 && !strcmp(b, "written later"), "mapping -> fd");
    (void)!pwrite(sfd, "via fd", 6, 0);
    CHECK(!memcmp(sh, "via fd", 6), "fd -> mapping: '%.6s'", sh);
    CHECK(pr[0] == 'A' && pr[4095] == 'A' && pr[4096] == 'z' && pr[4097] == 'B',
          "private mapping: %c %c %c %c", pr[0], pr[4095], pr[4096], pr[4097]);
    return finish();
}
