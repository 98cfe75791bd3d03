/* rseq: an rseq critical section aborted in the clone. The thread spins in a critical section
 * (glibc's registered rseq area, its rseq_cs pointed at a descriptor) until a SIGALRM handler
 * sets a flag; the signal's delivery (or a preemption before it) aborts the section, and the
 * kernel first checks the 4 bytes before the abort address against the signature the thread
 * registered: right, it jumps to the abort handler; wrong (a clone whose registration came back
 * with signature 0), it kills the process with SIGSEGV. Run once before the checkpoint and
 * once after. */
#include "conform.h"
#include <signal.h>
#include <stdint.h>
#include <sys/rseq.h>
#include <sys/time.h>

static volatile int stop;

static void on_alarm(int sig)
{
    (void)sig;
    stop = 1;
}

/* 1 if the critical section was aborted (what must happen), 0 if it ran to its end */
static int run_section(void)
{
    uint64_t *cs = (uint64_t *)((char *)__builtin_thread_pointer() + __rseq_offset + 8);
    int aborted;
    stop = 0;
    struct itimerval it = { { 0, 0 }, { 0, 20000 } };
    setitimer(ITIMER_REAL, &it, NULL);
    __asm__ volatile(
        "leaq 3f(%%rip), %%rax\n\t"
        "movq %%rax, (%[cs])\n\t"
        "1:\n\t"
        "cmpl $0, (%[stop])\n\t"
        "je 1b\n\t"
        "2:\n\t"
        "movl $0, %[ab]\n\t"
        "jmp 5f\n\t"
        ".pushsection __rseq_cs, \"aw\"\n\t"
        ".balign 32\n\t"
        "3: .long 0, 0\n\t"
        ".quad 1b, 2b - 1b, 4f\n\t"
        ".popsection\n\t"
        ".byte 0x0f, 0xb9, 0x3d\n\t"
        ".long 0x53053053\n\t"           /* RSEQ_SIG, glibc's on x86 */
        "4:\n\t"
        "movl $1, %[ab]\n\t"
        "5:\n\t"
        : [ab] "=m"(aborted)
        : [cs] "r"(cs), [stop] "r"(&stop)
        : "rax", "memory", "cc");
    while (!stop)                        /* aborted by a preemption: the alarm is still due */
        ;
    *cs = 0;
    return aborted;
}

int main(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    if (__rseq_size == 0) {
        (void)!write(1, "FAIL: glibc did not register rseq\n", 34);
        return 1;
    }
    CHECK(run_section() == 1, "before the checkpoint: the critical section was not aborted");
    ready();
    wait_go();
    CHECK(run_section() == 1, "the critical section was not aborted");
    return finish();
}
