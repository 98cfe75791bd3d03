/* Deleted-but-open files: a file written (with a hole), opened twice (O_RDWR at an offset, and
 * O_WRONLY|O_APPEND), a dup of the first, then unlinked. After restore: the contents (hole
 * included), each fd's offset and flags, the shared offset of the dup, the size, the mode, and
 * that writes through one open file description are seen through the other (one file).
 * argv[1]: a scratch directory. */
#include "conform.h"
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    char path[512];
    snprintf(path, sizeof path, "%s/gone", argv[1]);
    int a = open(path, O_RDWR | O_CREAT | O_TRUNC, 0640);
    CHECK(a >= 0, "open");
    char blk[4096];
    for (int i = 0; i < 4096; i++)
        blk[i] = (char)('a' + i % 26);
    (void)!pwrite(a, blk, 4096, 0);
    (void)!pwrite(a, "tail", 4, 3 * 65536);           /* a hole of ~188 KiB before it */
    lseek(a, 100, SEEK_SET);
    int b = open(path, O_WRONLY | O_APPEND);
    int d = dup(a);
    unlink(path);
    ready();
    wait_go();
    struct stat st;
    CHECK(fstat(a, &st) == 0 && st.st_size == 3 * 65536 + 4, "size %ld", (long)st.st_size);
    CHECK((st.st_mode & 0777) == 0640, "mode %o", st.st_mode & 0777);
    CHECK(lseek(a, 0, SEEK_CUR) == 100, "offset %ld", (long)lseek(a, 0, SEEK_CUR));
    CHECK((fcntl(a, F_GETFL) & O_ACCMODE) == O_RDWR, "a flags");
    CHECK((fcntl(b, F_GETFL) & (O_ACCMODE | O_APPEND)) == (O_WRONLY | O_APPEND), "b flags");
    char got[4096];
    CHECK(read(d, got, 10) == 10 && !memcmp(got, blk + 100, 10), "read at offset");
    CHECK(lseek(a, 0, SEEK_CUR) == 110, "dup does not share the offset");
    CHECK(pread(a, got, 4096, 0) == 4096 && !memcmp(got, blk, 4096), "contents");
    char z[16] = { 1 };
    CHECK(pread(a, z, 16, 65536) == 16 && !memcmp(z, "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0", 16),
          "hole");
    CHECK(pread(a, z, 16, 3 * 65536) == 4 && !memcmp(z, "tail", 4), "tail");
    CHECK(write(b, "more", 4) == 4, "append");
    CHECK(pread(a, z, 16, 3 * 65536) == 8 && !memcmp(z, "tailmore", 8), "one file: '%.8s'", z);
    return finish();
}
