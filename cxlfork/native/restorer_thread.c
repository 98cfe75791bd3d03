/* cxlfork-restorer: creating a restored thread (plan OP_THREAD): a raw clone onto its stack,
 * then the thread sets its own sigaltstack, rseq, tid address, robust list, name and
 * credentials and parks
 * at THREAD_PARK, where cxlfork keeps it until the hand-over. */
#include "restorer.h"

/* clone(flags, newsp) for a thread: the child pops its record from the new stack and runs
 * cx_thread_main; the parent returns the new tid (or -errno). */
long cx_clone_thread(long flags, uint64_t *newsp);
__asm__(".text\n.globl cx_clone_thread\ncx_clone_thread:\n"
        "  mov $56, %eax\n"
        "  xor %edx, %edx\n"
        "  xor %r10d, %r10d\n"
        "  xor %r8d, %r8d\n"
        "  syscall\n"
        "  test %rax, %rax\n"
        "  jz 1f\n"
        "  ret\n"
        "1: pop %rdi\n"
        "  and $-16, %rsp\n"
        "  call cx_thread_main\n"
        "  ud2\n");

/* clone3(args, size) for a thread, the child as in cx_clone_thread. */
long cx_clone3_raw(const uint64_t *args, long size);
__asm__(".text\n.globl cx_clone3_raw\ncx_clone3_raw:\n"
        "  mov $435, %eax\n"
        "  syscall\n"
        "  test %rax, %rax\n"
        "  jz 1f\n"
        "  ret\n"
        "1: pop %rdi\n"
        "  and $-16, %rsp\n"
        "  call cx_thread_main\n"
        "  ud2\n");

/* The same thread under the given tid in this process's PID namespace (clone3 set_tid; the
 * stack starts at newsp, which is 32 KiB above the bottom of its stack). -errno if taken. */
long cx_clone3_thread(long flags, uint64_t *newsp, long tid)
{
    int t = (int)tid;
    /* flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid,
     * set_tid_size, cgroup */
    uint64_t a[11] = { (uint64_t)flags, 0, 0, 0, 0, (uint64_t)newsp - 0x8000, 0x8000, 0,
                       (uint64_t)&t, 1, 0 };
    return cx_clone3_raw(a, sizeof a);
}

/* A restored thread's own state, then park at THREAD_PARK. rec (in the plan): sigaltstack
 * sp/flags/size, rseq address/length/signature, tid address, robust list head/length, index,
 * then its name (16 bytes), then the address of the process's credentials record
 * (restorer_creds.c), taken before it parks. */
__attribute__((used, noreturn)) void cx_thread_main(const uint64_t *rec)
{
    long r;
    if (!(rec[1] & 2)) {                       /* SS_DISABLE: nothing to set */
        uint64_t ss[3] = { rec[0], rec[1] & ~1UL & 0xffffffffUL, rec[2] };
        if ((r = sc(NR_sigaltstack, ss, 0, 0)) < 0)
            fail("sigaltstack of a thread", (long)rec[9], rec[0], r);
    }
    if (rec[3] && (r = sc6(NR_rseq, rec[3], rec[4], 0, rec[5], 0, 0)) < 0)
        fail("rseq of a thread", (long)rec[9], rec[3], r);
    sc(NR_set_tid_address, rec[6], 0, 0);
    if (rec[7] && (r = sc(NR_set_robust_list, rec[7], rec[8], 0)) < 0)
        fail("set_robust_list of a thread", (long)rec[9], rec[7], r);
    if (((const char *)&rec[10])[0])            /* its name (comm), NUL-padded */
        sc(NR_prctl, 15 /* PR_SET_NAME */, &rec[10], 0);
    cx_thread_creds((const uint64_t *)rec[12], (long)rec[9]);
    uint64_t mask = ~(1UL << 10);              /* only SIGSEGV, for the park below */
    sc6(NR_rt_sigprocmask, 2, (long)&mask, 0, 8, 0, 0);
    ((void (*)(void))THREAD_PARK)();
    __builtin_unreachable();
}
