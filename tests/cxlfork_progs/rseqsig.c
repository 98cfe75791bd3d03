/* rseq: glibc's registration comes back with its signature, so registering the same area
 * again fails with EBUSY (registered, same signature) and not EPERM (other signature) or
 * EINVAL (other area or length). */
#include "conform.h"
#include <errno.h>
#include <sched.h>
#include <sys/rseq.h>
#include <sys/syscall.h>

static int again(unsigned len)
{
    void *area = (char *)__builtin_thread_pointer() + __rseq_offset;
    return syscall(SYS_rseq, area, len, 0, RSEQ_SIG) < 0 ? errno : 0;
}

int main(void)
{
    unsigned lens[] = { __rseq_size, 32, 20 }, len = 0;
    for (int i = 0; i < 3 && !len; i++)
        if (lens[i] && again(lens[i]) == EBUSY)
            len = lens[i];
    if (!len)
        return printf("FAIL: glibc registered no rseq area\n"), 1;
    ready();
    wait_go();
    int e = again(len);
    CHECK(e == EBUSY, "registering rseq again: errno %d (%s)", e,
          e == EPERM ? "the signature was lost" : "expected EBUSY");
    CHECK(sched_getcpu() >= 0, "sched_getcpu");
    return finish();
}
