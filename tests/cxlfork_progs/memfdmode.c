/* A memfd's mode set with fchmod (0640) survives; so does a second memfd left
 * at the default (0777). */
#include "conform.h"
#include <sys/mman.h>
#include <sys/stat.h>

int main(void)
{
    int a = memfd_create("mode-a", 0), b = memfd_create("mode-b", 0);
    (void)!ftruncate(a, 4096);
    char *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, a, 0);
    strcpy(m, "mode");
    fchmod(a, 0640);


    ready();
    wait_go();
    struct stat st;
    CHECK(fstat(a, &st) == 0 && (st.st_mode & 07777) == 0640, "memfd mode %o",
          st.st_mode & 07777);
    CHECK(fstat(b, &st) == 0 && (st.st_mode & 07777) == 0777, "default memfd mode %o",
          st.st_mode & 07777);
    CHECK(!strcmp(m, "mode"), "memfd mapping");
    return finish();
}
