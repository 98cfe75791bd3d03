/* cxlfork C helpers (the cffi interface): hashing (hash.c), ptrace freeze/inject (ptrace.c),
 * fds seen from outside (fdpeek.c), page dump into the store (dump.c), spawn of the restorer
 * (spawn.c), the ptrace hand-over of a restore (handover.c), the userfaultfd handler of clones
 * (lazy.c), event and timer fds (evfd.c), namespaces (netns.c). */
#include <stdint.h>

typedef struct { uint64_t h[4]; uint64_t n; } cx_hash_t;

void cx_hash_init(cx_hash_t *s);
void cx_hash_update(cx_hash_t *s, const void *p, uint64_t len);
uint64_t cx_hash_final(const cx_hash_t *s);
uint64_t cx_hash_file(int fd, uint64_t off, uint64_t len);

int cx_seize(int pid);
int cx_wait(int pid, int timeout_ms, int *status);
int cx_detach(int pid, int sig);
int cx_cont(int pid, int sig);
int cx_getregset(int pid, int type, void *buf, int size);
int cx_setregset(int pid, int type, const void *buf, int size);
int cx_get_rseq(int pid, uint64_t *out4);
int cx_get_robust_list(int pid, uint64_t *head, uint64_t *len);
int cx_inject(int pid, const void *saved_regs, uint64_t syscall_ip, long nr,
              long a0, long a1, long a2, long a3, long a4, long a5, long *ret, void *siginfo);
int cx_requeue(int tgid, int tid, int sig, const void *siginfo);
int cx_kcmp_file(int pid, int fd1, int fd2);
int cx_pidfd_getfd(int pid, int fd);
int cx_tee(int in_fd, int out_fd, uint64_t len);
int cx_memfd(const char *name, int flags);
int cx_open_as(const char *path, int flags, unsigned uid, unsigned gid, int ngroups,
               const unsigned *groups);
int cx_unshare(int flags);                    /* netns.c */
int cx_setns(int fd, int nstype);
int cx_mount(const char *src, const char *dst, const char *fstype, unsigned long flags);
int cx_umount2(const char *dst, int flags);

int64_t cx_dump_runs(int pid, int memfd, int n, const uint64_t *addr, const uint64_t *len,
                     void *dst, cx_hash_t *h, int outfd, uint64_t out_off);
enum { CX_DUMP_BATCH = 1048576 };   /* bytes per batch of cx_dump_runs */
int cx_mbind_shared(void *addr, uint64_t len, int node);
int64_t cx_present_runs(int pmfd, uint64_t start, uint64_t end, int file_ok, uint64_t *out,
                        int64_t cap);

enum { CX_CG_NONE = 0, CX_CG_DIR = 1, CX_CG_PROCS = 2 };
int cx_spawn(const char *path, char *const argv[], const int *src, const int *dst, int nfd,
             const char *cwd, int umask_, int sidmode, int set_tid, int errfd, int cgfd,
             int cgkind);
/* one child of a process of a tree, spawned by its parent before the parent's own exec */
struct cx_kid {
    char *const *argv;
    const int *src, *dst;
    int nfd, umask_, sidmode, errfd, set_tid;
    const char *cwd;
    int zombie;          /* >= 0: a zombie child, its wait status: it only exits so */
    int nkids;           /* its own children (forked by it first, before its exec) */
    const struct cx_kid *kids;
};
int cx_spawn_tree(const char *path, char *const argv[], const int *src, const int *dst,
                  int nfd, const char *cwd, int umask_, int sidmode, int set_tid, int errfd,
                  int cgfd, int cgkind, int nkids, const struct cx_kid *kids);
int cx_start(int pid, int gofd, int traceclone);
enum { CX_GHOST_MAXFD = 253, CX_GHOST_MSG = 8192 };
int cx_ghost_send(int sock, const int *src, const int *dst, int nfd, const char *cwd, int umask_,
                  int sidmode, int errindex, int planfd, uint64_t nsidx);
int cx_wait_threads(int pid, int nthreads, int *tids, uint64_t park, int gofd, int timeout_ms);
int cx_wait_handover(int pid, int errfd, int timeout_ms, int *status_out, int *pending);
int cx_wait_fd(int fd, int timeout_ms);
int cx_finish(int pid, const void *regs, int rsize, const void *xs, int xsize, uint64_t sigmask,
              int pending);
int cx_kill(int pid, int sig);

/* userfaultfd handler of clones (lazy.c): lazy moa copies, anonymous semantics of store pages */
enum { CX_LAZY_BLOCK = 262144 };   /* bytes copied around a faulting page (lazy moa) */
enum { CX_MAP_BLOCK = 1048576 };   /* bytes of store pages mapped around one (mow, hybrid) */
int cx_lazy_add(int sock, int pidfd, int copy, int store_fd, uint64_t store_len, int n,
                const uint64_t *addr, const uint64_t *len, const uint64_t *off);
int cx_lazy_serve(void);
void cx_lazy_pause(void);
int cx_lazy_sync(int timeout_ms);
void cx_lazy_stats(uint64_t *out8);

int cx_kcmp_epoll_tfd(int pid, int fd, int epfd, int tfd, int toff);
int cx_timerfd_make(int clock, int flags, int settime_flags, int64_t isec, int64_t insec,
                    int64_t vsec, int64_t vnsec, uint64_t ticks);
int cx_timerfd_take_ticks(int fd, uint64_t *out);
int cx_signalfd_make(uint64_t mask, int flags);
int cx_inotify_init(int flags);
int cx_inotify_add(int fd, const char *path, uint32_t mask);
int cx_inotify_rm(int fd, int wd);
int cx_open_by_handle(int mount_fd, int type, const unsigned char *bytes, int len, int flags);
int cx_peek_siginfo(int tid, int shared, int max, void *buf);
