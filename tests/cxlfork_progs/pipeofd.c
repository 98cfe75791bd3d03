/* Two open file descriptions of one pipe: the read and the write end each opened a second
 * time through /proc/self/fd/N with O_NONBLOCK. Each fd must keep its own status flags (the
 * originals blocking, the reopened ones not) and all four must reach the same pipe. */
#include "conform.h"
#include <errno.h>
#include <fcntl.h>

int main(void)
{
    int p[2];
    char path[64], b[16] = { 0 };
    (void)!pipe(p);
    snprintf(path, sizeof path, "/proc/self/fd/%d", p[0]);
    int r2 = open(path, O_RDONLY | O_NONBLOCK);
    snprintf(path, sizeof path, "/proc/self/fd/%d", p[1]);
    int w2 = open(path, O_WRONLY | O_NONBLOCK);
    if (r2 < 0 || w2 < 0)
        return printf("FAIL: reopen of the pipe\n"), 1;
    (void)!write(p[1], "buf", 3);
    ready();
    wait_go();
    CHECK(!(fcntl(p[0], F_GETFL) & O_NONBLOCK), "read end gained O_NONBLOCK");
    CHECK(fcntl(r2, F_GETFL) & O_NONBLOCK, "reopened read end lost O_NONBLOCK");
    CHECK(!(fcntl(p[1], F_GETFL) & O_NONBLOCK), "write end gained O_NONBLOCK");
    CHECK(fcntl(w2, F_GETFL) & O_NONBLOCK, "reopened write end lost O_NONBLOCK");
    CHECK(read(r2, b, sizeof b) == 3 && !memcmp(b, "buf", 3), "buffered bytes: '%s'", b);
    errno = 0;
    CHECK(read(r2, b, sizeof b) < 0 && errno == EAGAIN, "empty non-blocking read: errno %d",
          errno);
    CHECK(write(w2, "x", 1) == 1 && read(p[0], b, 1) == 1 && b[0] == 'x',
          "reopened write end -> read end");
    CHECK(write(p[1], "y", 1) == 1 && read(r2, b, 1) == 1 && b[0] == 'y',
          "write end -> reopened read end");
    return finish();
}
