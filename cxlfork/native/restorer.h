/* Shared by the files of cxlfork-restorer (restorer.c: start-up, errors, the plan's ops;
 * restorer_ghost.c: ghost mode; restorer_thread.c: thread creation): the region's layout,
 * the plan's format, syscall numbers and the raw syscall helper. No libc. */
#ifndef CX_RESTORER_H
#define CX_RESTORER_H
#include <stdint.h>

#define REGION_LO   0x100000000000UL
#define REGION_HI   0x100040000000UL
#define SELF_TMP    (REGION_LO + 0x10000000UL)
#define PLAN_ADDR   (REGION_LO + 0x20000000UL)
#define SPECIAL_TMP (REGION_LO + 0x30000000UL)
#define TASK_TOP    0x7ffffffff000UL
#define THREAD_STACKS (REGION_LO + 0x38000000UL)
#define THREAD_STACK  0x10000UL
#define THREAD_PARK   (REGION_LO + 0x3ffff000UL)   /* never mapped */

#define PLAN_MAGIC 0x314e414c50584643UL   /* "CFXPLAN1" little-endian */
#define PLAN_VERSION 7

enum { OP_MMAP = 1, OP_PREAD, OP_MPROTECT, OP_MADVISE, OP_SIGACTION, OP_SIGALTSTACK,
       OP_SIGMASK, OP_RSEQ, OP_TIDADDR, OP_ROBUST, OP_MM_MAP, OP_CLOSE, OP_CLOEXEC, OP_PRCTL,
       OP_PRLIMIT, OP_WAITGO, OP_UFFD_OPEN, OP_UFFD_REG, OP_UFFD_SEND, OP_THREAD, OP_CLOSEFROM,
       OP_GHOSTWAIT, OP_TIMER_CREATE, OP_TIMER_SET, OP_SETITIMER, OP_EPOLL_CTL,
       OP_SIGQUEUE, OP_EPOLL_FIRED, OP_MLOCK, OP_MLOCKALL, OP_CREDS };

#define NR_read 0
#define NR_write 1
#define NR_close 3
#define NR_fstat 5
#define NR_mmap 9
#define NR_mprotect 10
#define NR_munmap 11
#define NR_rt_sigaction 13
#define NR_rt_sigprocmask 14
#define NR_pread64 17
#define NR_mremap 25
#define NR_madvise 28
#define NR_getpid 39
#define NR_exit_group 231
#define NR_kill 62
#define NR_fcntl 72
#define NR_sigaltstack 131
#define NR_prctl 157
#define NR_set_tid_address 218
#define NR_set_robust_list 273
#define NR_rseq 334
#define NR_prlimit64 302
#define NR_ioctl 16
#define NR_sendmsg 46
#define NR_userfaultfd 323
#define NR_recvmsg 47
#define NR_dup2 33
#define NR_chdir 80
#define NR_umask 95
#define NR_setsid 112
#define NR_setpgid 109
#define NR_close_range 436
#define NR_setns 308
#define NR_timer_create 222
#define NR_timer_settime 223
#define NR_setitimer 38
#define NR_epoll_ctl 233
#define NR_epoll_wait 232
#define NR_poll 7
#define NR_rt_sigqueueinfo 129
#define NR_rt_tgsigqueueinfo 297
#define NR_mlock2 325
#define NR_mlockall 151
#define PR_TIMER_CREATE_RESTORE_IDS 77

#define GHOST_MAGIC 0x3154534f48475843UL   /* "CXGHOST1" little-endian */
#define GHOST_MAXFD 253                      /* SCM_MAX_FD */

static inline long sc6(long n, long a, long b, long c, long d, long e, long f)
{
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    long ret;
    __asm__ volatile("syscall" : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
#define sc(n, a, b, c) sc6(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)

extern int errfd;
void fail(const char *what, long op, unsigned long addr, long err) __attribute__((noreturn));
long cx_ghost_wait(long sock);
long cx_clone_thread(long flags, uint64_t *newsp);
long cx_clone3_thread(long flags, uint64_t *newsp, long tid);
__attribute__((noreturn)) void cx_init_main(void);
long cx_apply_creds(const uint64_t *c, long op);
void cx_thread_creds(const uint64_t *c, long index);
#endif
