/* Declarations of tiermem's C helpers; shared by the cffi cdef and the C source. */
#include <stdint.h>

/* NUMA placement syscalls (raw, no libnuma). Return 0 / count, or -errno. */
long tm_move_pages(int pid, unsigned long count, const uint64_t *pages,
                   const int *nodes, int *status, int flags);
long tm_migrate_pages(int pid, unsigned long maxnode,
                      const unsigned long *old_nodes, const unsigned long *new_nodes);
long tm_mbind(uint64_t addr, uint64_t len, int mode,
              const unsigned long *nodemask, unsigned long maxnode, unsigned int flags);
long tm_set_mempolicy(int mode, const unsigned long *nodemask, unsigned long maxnode);
long tm_get_mempolicy(int *mode, unsigned long *nodemask, unsigned long maxnode,
                      uint64_t addr, unsigned long flags);

/* Cross-process memory access. Return bytes moved or -errno. */
int64_t tm_process_vm_readv(int pid, void *local, uint64_t remote, uint64_t len);
int64_t tm_process_vm_writev(int pid, const void *local, uint64_t remote, uint64_t len);

/* /proc/PID/pagemap: read npages 64-bit entries starting at vaddr. Returns entries read or -errno. */
int64_t tm_pagemap_read(int pid, uint64_t vaddr, uint64_t npages, uint64_t *out);
/* Same with an already open pagemap fd (for callers that read many ranges). */
int64_t tm_pagemap_read_fd(int fd, uint64_t vaddr, uint64_t npages, uint64_t *out);

/* Memory on a node for the microbenchmarks: mmap + mbind(MPOL_BIND) + touch. NULL on error
 * (errno set). tm_free releases it. */
void *tm_alloc_on_node(uint64_t size, int node, int hugepages);
void tm_free(void *p, uint64_t size);
/* Pointer chasing over a random cyclic permutation of cache lines in buf: ns per load. */
double tm_latency_chase(void *buf, uint64_t size, uint64_t loads, uint64_t seed);
/* Streaming read of buf, repeated `passes` times: bytes per second. */
double tm_bandwidth_read(void *buf, uint64_t size, int passes);
/* memcpy of size bytes between two buffers: bytes per second (baseline for page moves). */
double tm_memcpy_rate(void *dst, const void *src, uint64_t size, int passes);
/* Monotonic clock in ns. */
uint64_t tm_now_ns(void);
