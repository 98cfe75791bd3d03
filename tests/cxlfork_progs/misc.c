/* Time through the vDSO (which must be at its old address), rseq (glibc registers it; the
 * kernel must keep cpu_id current), getpid after restore, brk growth. */
#include "conform.h"
#include <sched.h>
#include <stdint.h>
#include <sys/auxv.h>
#include <sys/time.h>
#include <time.h>


int main(void)
{
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uintptr_t vdso = getauxval(AT_SYSINFO_EHDR);
    ready();
    wait_go();
    clock_gettime(CLOCK_MONOTONIC, &t1);
    CHECK(t1.tv_sec > t0.tv_sec || (t1.tv_sec == t0.tv_sec && t1.tv_nsec >= t0.tv_nsec),
          "monotonic clock went back");
    struct timeval tv;
    CHECK(gettimeofday(&tv, NULL) == 0 && tv.tv_sec > 1600000000, "gettimeofday");
    char line[512], want[32];
    snprintf(want, sizeof want, "%lx-", (unsigned long)vdso);
    FILE *f = fopen("/proc/self/maps", "r");
    int ok = 0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, want, strlen(want)) && strstr(line, "[vdso]"))
            ok = 1;
    fclose(f);
    CHECK(ok, "[vdso] not at %#lx", (unsigned long)vdso);
    int cpu = sched_getcpu();
    CHECK(cpu >= 0 && cpu < 4096, "sched_getcpu %d", cpu);
    f = fopen("/proc/self/status", "r");
    int pid_ok = 0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "Pid:", 4) && atoi(line + 4) == getpid())
            pid_ok = 1;
    fclose(f);
    CHECK(pid_ok, "getpid");
    char *b = sbrk(0);
    CHECK(sbrk(1 << 20) == b && (memset(b, 1, 1 << 20), b[(1 << 20) - 1] == 1), "brk growth");
    return finish();
}
