/* Named FIFOs: a FIFO opened read-only non-blocking and write-only (and a second FIFO opened
 * read-write). After restore: each fd is open on the FIFO at the same path, with its access
 * mode and O_NONBLOCK, and bytes written on the write fd come out of the read fd (the clone
 * shares each FIFO with whoever opened the path; the test runs the original first).
 * argv[1]: a scratch directory. */
#include "conform.h"
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    char p1[512], p2[512];
    snprintf(p1, sizeof p1, "%s/fifo1", argv[1]);
    snprintf(p2, sizeof p2, "%s/fifo2", argv[1]);
    CHECK(mkfifo(p1, 0600) == 0 && mkfifo(p2, 0640) == 0, "mkfifo");
    int r = open(p1, O_RDONLY | O_NONBLOCK);
    int w = open(p1, O_WRONLY);
    int rw = open(p2, O_RDWR);
    CHECK(r >= 0 && w >= 0 && rw >= 0, "open");
    struct stat s1, s2;
    stat(p1, &s1);
    stat(p2, &s2);
    ready();
    wait_go();
    struct stat f;
    CHECK(fstat(r, &f) == 0 && S_ISFIFO(f.st_mode) && f.st_ino == s1.st_ino, "r: not %s", p1);
    CHECK(fstat(w, &f) == 0 && S_ISFIFO(f.st_mode) && f.st_ino == s1.st_ino, "w: not %s", p1);
    CHECK(fstat(rw, &f) == 0 && f.st_ino == s2.st_ino, "rw: not %s", p2);
    CHECK((fcntl(r, F_GETFL) & (O_ACCMODE | O_NONBLOCK)) == (O_RDONLY | O_NONBLOCK), "r flags");
    CHECK((fcntl(w, F_GETFL) & (O_ACCMODE | O_NONBLOCK)) == O_WRONLY, "w flags");
    CHECK((fcntl(rw, F_GETFL) & (O_ACCMODE | O_NONBLOCK)) == O_RDWR, "rw flags");
    char b[16] = { 0 };
    errno = 0;
    CHECK(read(r, b, sizeof b) < 0 && errno == EAGAIN, "r: not empty (errno %d)", errno);
    CHECK(write(w, "hello", 5) == 5 && read(r, b, sizeof b) == 5 && !memcmp(b, "hello", 5),
          "w -> r: '%s'", b);
    CHECK(write(rw, "xy", 2) == 2 && read(rw, b, sizeof b) == 2 && !memcmp(b, "xy", 2),
          "rw -> rw");
    return finish();
}
