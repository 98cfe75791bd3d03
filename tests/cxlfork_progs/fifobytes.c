/* A named FIFO holding 3 bytes at checkpoint (argv[1]: a scratch directory); after the
 * checkpoint the bytes are still there for the original to read. */
#include "conform.h"
#include <fcntl.h>
#include <sys/stat.h>

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    char p[512], b[8] = { 0 };
    snprintf(p, sizeof p, "%s/fifo", argv[1]);
    mkfifo(p, 0600);
    int fd = open(p, O_RDWR);
    (void)!write(fd, "abc", 3);
    ready();
    wait_go();
    CHECK(read(fd, b, sizeof b) == 3 && !memcmp(b, "abc", 3), "FIFO bytes: '%s'", b);
    return finish();
}
