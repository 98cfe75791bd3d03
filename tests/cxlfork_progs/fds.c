/* Files and process attributes: a file at an offset, an O_APPEND file, a directory, /dev/null,
 * a pipe with buffered bytes, an eventfd, a memfd mapped shared, a dup, FD_CLOEXEC, cwd,
 * umask, rlimits. */
#include "conform.h"
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : "/tmp";
    char p1[512], p2[512];
    snprintf(p1, sizeof p1, "%s/data.txt", dir);
    snprintf(p2, sizeof p2, "%s/log.txt", dir);
    int f = open(p1, O_RDWR | O_CREAT | O_TRUNC, 0600);
    (void)!write(f, "0123456789abcdef", 16);
    lseek(f, 10, SEEK_SET);
    int app = open(p2, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0600);
    (void)!write(app, "one\n", 4);
    int d = open(dir, O_RDONLY | O_DIRECTORY);
    int null = open("/dev/null", O_WRONLY);
    int pfd[2];
    (void)!pipe(pfd);
    (void)!write(pfd[1], "buffered", 8);
    int ev = eventfd(5, EFD_NONBLOCK);
    int mfd = memfd_create("conform", 0);
    (void)!ftruncate(mfd, 8192);
    char *mm = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    strcpy(mm + 4096, "in the memfd");
    lseek(mfd, 4096, SEEK_SET);
    int dupf = dup(f);
    int cx = open("/dev/null", O_RDONLY | O_CLOEXEC);
    (void)!chdir(dir);
    umask(027);
    struct rlimit rl = { 1000, 4096 };
    setrlimit(RLIMIT_NOFILE, &rl);
    struct rlimit core = { 12345, 67890 };
    setrlimit(RLIMIT_CORE, &core);
    ready();
    wait_go();
    char b[32] = { 0 };
    CHECK(read(f, b, 6) == 6 && !memcmp(b, "abcdef", 6), "file offset: got '%s'", b);
    CHECK(lseek(dupf, 0, SEEK_CUR) == 16, "dup shares the offset");
    struct stat before;
    stat(p2, &before);             /* the original and its clones append to the same file */
    (void)!write(app, "two\n", 4);
    int chk = open(p2, O_RDONLY);
    memset(b, 0, sizeof b);
    CHECK(pread(chk, b, 4, before.st_size) == 4 && !strcmp(b, "two\n") &&
          lseek(app, 0, SEEK_CUR) >= before.st_size + 4, "O_APPEND: '%s'", b);
    CHECK(fcntl(app, F_GETFL) & O_APPEND, "O_APPEND flag");
    struct stat st1, st2;
    fstat(d, &st1);
    stat(dir, &st2);
    CHECK(st1.st_ino == st2.st_ino && S_ISDIR(st1.st_mode), "directory fd");
    CHECK(write(null, "x", 1) == 1, "/dev/null");
    memset(b, 0, sizeof b);
    CHECK(read(pfd[0], b, 31) == 8 && !strcmp(b, "buffered"), "pipe data: '%s'", b);
    (void)!write(pfd[1], "more", 4);
    CHECK(read(pfd[0], b, 4) == 4 && !memcmp(b, "more", 4), "pipe still connected");
    uint64_t v = 0;
    CHECK(read(ev, &v, 8) == 8 && v == 5, "eventfd count %lu", (unsigned long)v);
    CHECK(fcntl(ev, F_GETFL) & O_NONBLOCK, "eventfd nonblock");
    memset(b, 0, sizeof b);
    CHECK(read(mfd, b, 12) == 12 && !strcmp(b, "in the memfd"), "memfd read '%s'", b);
    CHECK(!strcmp(mm + 4096, "in the memfd"), "memfd mapping");
    mm[0] = 'Z';
    CHECK(pread(mfd, b, 1, 0) == 1 && b[0] == 'Z', "memfd mapping shared with its fd");
    CHECK(fcntl(cx, F_GETFD) == FD_CLOEXEC, "FD_CLOEXEC");
    CHECK(fcntl(f, F_GETFD) == 0, "no FD_CLOEXEC");
    char cwd[512];
    CHECK(getcwd(cwd, sizeof cwd) && !strcmp(cwd, dir), "cwd '%s'", cwd);
    mode_t old = umask(0);
    CHECK(old == 027, "umask %o", old);
    getrlimit(RLIMIT_NOFILE, &rl);
    CHECK(rl.rlim_cur == 1000 && rl.rlim_max == 4096, "RLIMIT_NOFILE");
    getrlimit(RLIMIT_CORE, &core);
    CHECK(core.rlim_cur == 12345 && core.rlim_max == 67890, "RLIMIT_CORE");
    return finish();
}
