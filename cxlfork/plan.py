"""The restore plan: the compact binary program cxlfork-restorer runs (see native/restorer.c).

Header (u64 words): magic, version, op count, ops offset, special count, original vDSO
address, 4 x (address, length) of vvar/vvar_vclock/vdso, error fd, region low, region high,
then the ops, 8 u64 each: type and up to 7 arguments, then the auxv bytes and the
prctl_mm_map that PR_SET_MM_MAP reads (pointers are absolute: the plan is mapped at PLAN_ADDR).

How a policy turns into ops, per mapping of the image:
    anon    mmap anonymous (MAP_GROWSDOWN for stacks); then each stored run either
            mmap'd from the page file MAP_PRIVATE (mow; hybrid for pages nobody touched) or
            pread into the anonymous memory (moa; hybrid for touched pages; always for stacks)
    file    mmap the file (MAP_PRIVATE/MAP_SHARED); its copied-on-write pages mapped from the
            page file MAP_PRIVATE over it (mow; hybrid for pages nobody touched), or pread
            back in (moa; hybrid for touched pages)
    shmem   mmap the clone's own memfd holding the object (MAP_SHARED, or MAP_PRIVATE + its
            copied-on-write pages as for files)
Then signals, rseq, tid address, robust list, PR_SET_MM_MAP, name (a warm ghost stops here),
the userfaultfd of the store-mapped anonymous runs (lazy moa copies; anonymous semantics of
MADV_DONTNEED/mremap under every policy but moa --eager), timers, epoll interest entries,
pending signals, rlimits, mlock/mlockall, FD_CLOEXEC, the go byte, threads (each takes the
process's credentials before it parks), the credentials (OP_CREDS, state.creds: the last op
that changes the process), closing fds.
"""
from __future__ import annotations

import base64
import struct

from cxlfork.state import pending

PLAN_MAGIC = 0x314E414C50584643
PLAN_VERSION = 7
REGION_LO, REGION_HI = 0x100000000000, 0x100040000000
PLAN_ADDR = REGION_LO + 0x20000000
THREAD_PARK = REGION_LO + 0x3ffff000        # never mapped; see restorer.c
HDR_WORDS = 32
(OP_MMAP, OP_PREAD, OP_MPROTECT, OP_MADVISE, OP_SIGACTION, OP_SIGALTSTACK, OP_SIGMASK, OP_RSEQ,
 OP_TIDADDR, OP_ROBUST, OP_MM_MAP, OP_CLOSE, OP_CLOEXEC, OP_PRCTL, OP_PRLIMIT,
 OP_WAITGO, OP_UFFD_OPEN, OP_UFFD_REG, OP_UFFD_SEND, OP_THREAD, OP_CLOSEFROM,
 OP_GHOSTWAIT, OP_TIMER_CREATE, OP_TIMER_SET, OP_SETITIMER, OP_EPOLL_CTL,
 OP_SIGQUEUE, OP_EPOLL_FIRED, OP_MLOCK, OP_MLOCKALL, OP_CREDS) = range(1, 32)
MAP_SHARED, MAP_PRIVATE, MAP_ANON, MAP_GROWSDOWN = 0x01, 0x02, 0x20, 0x100
PROT_W = 2
PROT_R = 1
MADV_POPULATE_READ = 22      # Linux 5.14+: fill page tables read-only, no copy
MADV_POPULATE_WRITE = 23     # Linux 5.14+: fault pages in writable (copy on write, zero fill)
# userfaultfd features of the clones' store-mapped anonymous runs (native/lazy.c): minor faults
# on shmem, and the REMAP, REMOVE, UNMAP and FORK events
UFFD_FEATURES = (1 << 10) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 1)
PAGE = 4096
POLICIES = ("mow", "moa", "hybrid")


class Plan:
    def __init__(self):
        self.ops: list[tuple[int, ...]] = []

    def op(self, *a: int) -> None:
        self.ops.append(tuple(int(x) & (2**64 - 1) for x in a) + (0,) * (8 - len(a)))


def _split_hot(run, hot: bytes | None):
    """Split a stored run [addr, pages, store_page] into (addr, pages, store_page, eager);
    hot is the hot.json bitmap over store pages (bit i of byte i // 8, least significant
    first)."""
    addr, n, sp = run
    if hot is None:
        yield addr, n, sp, False
        return

    def bit(k):
        return hot[k >> 3] >> (k & 7) & 1
    i = 0
    while i < n:
        b = bit(sp + i)
        j = i + 1
        while j < n and bit(sp + j) == b:
            j += 1
        yield addr + i * PAGE, j - i, sp + i, bool(b)
        i = j


def uffd_runs(m: dict, policy: str, lazy: bool = False, hot: bytes | None = None
              ) -> list[tuple[int, int, int]]:
    """The (address, bytes, page-file offset) of each anonymous run a clone maps from the
    store, which its restorer registers with a userfaultfd (native/lazy.c: lazy moa copies
    them on first touch; under every policy MADV_DONTNEED, mremap and munmap of them get
    anonymous semantics). Stacks are copied at restore, hybrid's hot pages too, moa --eager
    copies everything: none of those is registered. Sorted by address."""
    if policy == "moa" and not lazy:
        return []
    hot = hot if policy == "hybrid" else None
    return [(a, n * PAGE, sp * PAGE) for v in m["vmas"]
            if v["kind"] == "anon" and not v["growsdown"] and not v.get("lock")
            for r in v["runs"] for a, n, sp, eager in _split_hot(r, hot) if not eager]


def _store_runs(p, v: dict, runs, hot, copy_all: bool, store: int, populate: list) -> bool:
    """Fill the stored runs of VMA v: read into the mapping (copy_all, or hybrid's hot pages)
    or map the page file MAP_PRIVATE over them (readable ones noted in populate). A read into
    a mapping without PROT_WRITE opens it for writing first; True when the caller must put
    the VMA's protection back afterwards."""
    s, e, prot = v["start"], v["end"], v["prot"]
    needs_w = False
    for addr, n, sp, eager in (x for r in runs for x in _split_hot(r, hot)):
        if eager or copy_all:
            if not prot & PROT_W and not needs_w:
                p.op(OP_MPROTECT, s, e - s, prot | PROT_W)
                needs_w = True
            p.op(OP_PREAD, store, addr, n * PAGE, sp * PAGE)
        else:
            p.op(OP_MMAP, addr, n * PAGE, prot | (PROT_W if needs_w else 0),
                 MAP_PRIVATE, store, sp * PAGE)
            if prot & PROT_R:
                populate.append((addr, n * PAGE, sp * PAGE))
    return needs_w


HUGE = 2 << 20


def huge_blocks(populate) -> list[tuple[int, int]]:
    """(address, bytes) of the 2 MiB-aligned blocks of readable store mappings whose page-file
    offset is congruent to their address (cxlfork.pages places large anonymous runs so): on a
    store with 2 MiB folios each such block maps with one PMD."""
    out = []
    for addr, nbytes, off in populate:
        if (addr - off) % HUGE:
            continue
        lo, hi = -(-addr // HUGE) * HUGE, (addr + nbytes) // HUGE * HUGE
        if hi > lo:
            out.append((lo, hi - lo))
    return out


def _timer_ops(p: Plan, t: dict | None) -> None:
    """POSIX timers under their old IDs (to_main: SIGEV_THREAD_ID at the clone's main
    thread), armed with their remaining time; then the interval timers."""
    if not t:
        return
    for tm in t["posix"]:
        to_main = tm["notify"] & 4
        p.op(OP_TIMER_CREATE, tm["id"], tm["clock"], tm["notify"], tm["signo"], tm["value"],
             1 if to_main else 0)
    for tm in t["posix"]:
        if tm["value_ns"]:
            p.op(OP_TIMER_SET, tm["id"], tm["interval_ns"] // 10**9, tm["interval_ns"] % 10**9,
                 tm["value_ns"] // 10**9, tm["value_ns"] % 10**9)
    for which, name in enumerate(("real", "virtual", "prof")):
        it = t["itimers"].get(name)
        if it and it["value_us"]:
            p.op(OP_SETITIMER, which, it["interval_us"] // 10**6, it["interval_us"] % 10**6,
                 it["value_us"] // 10**6, it["value_us"] % 10**6)


EP_FLAGS = 0xF0000000            # EPOLLEXCLUSIVE | EPOLLWAKEUP | EPOLLONESHOT | EPOLLET
EPOLLONESHOT = 1 << 30


def _epoll_ops(p: Plan, m: dict) -> None:
    """The interest entries of the clone's epoll fds, added once its fd table is laid out
    (cxlfork.state.epoll): same target fd numbers, events and data. Per epoll fd, the
    one-shot entries that had fired (events: flags only) come first (OP_EPOLL_FIRED makes
    them fire again inside the restorer, so they end disabled, when their target is ready)."""
    for f in m["fds"]:
        if f["kind"] == "epoll" and f.get("dup_of") is None:
            fired = [e for e in f["entries"] if e["events"] & EPOLLONESHOT and
                     not e["events"] & ~EP_FLAGS]
            for e in fired:
                p.op(OP_EPOLL_FIRED, e["tfd"], f["fd"], e["events"], e["data"])
            for e in f["entries"]:
                if e not in fired:
                    p.op(OP_EPOLL_CTL, e["tfd"], f["fd"], e["events"], e["data"])


THREAD_REC = 104                # bytes of a thread record (restorer_thread.c)


def build(m: dict, policy: str, fdnums: dict, hot_bits: bytes | None = None,
          lazy: bool = False, warm_sock: int | None = None, prefault: bool = False,
          huge: bool = False, populate_write=(), creds: dict | None = None) -> bytes:
    """lazy (policy moa): map stored runs from the store as mow does (and copy each block on
    first touch, native/lazy.c). With fdnums['uffd_sock'] (any policy but moa --eager) the
    anonymous runs mapped from the store (uffd_runs) are registered with a userfaultfd in
    MINOR mode with UFFD_FEATURES, sent to cxlfork over that socket.
    fdnums: 'store', 'err', 'exe', 'go', ('file', vma index), ('obj', object id),
    'cloexec' (list); the process's own fds must be below 'err' and the restorer's above it.
    warm_sock: the plan of a warm ghost, which waits on that fd for the clone's fds after the
    memory, signal and mm parts. prefault (warm, not lazy): before it waits, the ghost fills
    the page tables of its readable store mappings read-only (MADV_POPULATE_READ), so the
    clone takes no minor fault reading store pages (a write still copies on write), and then
    makes the pages of populate_write ((address, bytes) ranges, cxlfork.firstreq: what earlier
    clones' first request wrote) private and writable (MADV_POPULATE_WRITE).
    huge (not lazy; the store's page file in 2 MiB folios): the huge_blocks of the store
    mappings are prefaulted read-only (MADV_POPULATE_READ, one PMD per 2 MiB: about 1 us
    each) before the userfaultfd registration, so the clone's first reads of them take no
    fault at all (a write, MADV_DONTNEED or mremap there drops that PMD: the 2 MiB fault
    back in page by page through the handler, as without huge).
    creds: the clones' credentials (state.creds.check_restorable; default: checked against
    this process's own, which its restorers have)."""
    if prefault and (warm_sock is None or lazy):
        raise ValueError("prefault is for the plans of warm ghosts that are not lazy")
    if any(n <= fdnums["err"] for k, n in fdnums.items() if k not in ("err", "cloexec")) or \
            any(n >= fdnums["err"] for n in fdnums.get("cloexec", [])):
        raise ValueError("the restorer's fds must be numbered above the error pipe")
    if policy not in POLICIES:
        raise ValueError(policy)
    hot = hot_bits if policy == "hybrid" else None
    p = Plan()
    store = fdnums["store"]
    specials = []
    populate = []                 # readable store-mapped runs: (address, bytes)
    for i, v in enumerate(m["vmas"]):
        s, e, prot = v["start"], v["end"], v["prot"]
        kind = v["kind"]
        if kind == "special":
            specials.append((v["start"], v["end"] - v["start"], v["path"]))
            continue
        runs = v["runs"]
        # stacks and locked mappings are copied (mlock of a writable private mapping would
        # copy every page anyway; a locked page must not fault to the store)
        eager_all = (policy == "moa" and not lazy) or v["growsdown"] or bool(v.get("lock"))
        if kind == "anon":
            flags = MAP_PRIVATE | MAP_ANON | (MAP_GROWSDOWN if v["growsdown"] else 0)
            p.op(OP_MMAP, s, e - s, prot, flags, -1, 0)
            needs_w = _store_runs(p, v, runs, hot, eager_all, store, populate)
        else:
            fd = fdnums[("file", i)] if kind == "file" else fdnums[("obj", v["object"])]
            p.op(OP_MMAP, s, e - s, prot, MAP_SHARED if v["shared"] else MAP_PRIVATE, fd,
                 v["offset"])
            # copied-on-write pages: mapped from the page file like anonymous runs (mow;
            # hybrid for pages nobody touched), else read into the file mapping
            needs_w = _store_runs(p, v, runs, hot, policy == "moa" or bool(v.get("lock")),
                                  store, populate)
        if needs_w:
            p.op(OP_MPROTECT, s, e - s, prot)
        for adv in v["madvise"]:
            p.op(OP_MADVISE, s, e - s, adv)

    sig = m["signals"]
    for a in sig["actions"]:
        p.op(OP_SIGACTION, a["sig"], a["handler"], a["flags"], a["restorer"], a["mask"])
    alt = sig["altstack"]
    if not alt["flags"] & 2:                       # SS_DISABLE
        p.op(OP_SIGALTSTACK, alt["sp"], alt["flags"] & ~1 & 0xFFFFFFFF, alt["size"])
    if m["rseq"]:
        r = m["rseq"]
        p.op(OP_RSEQ, r["addr"], r["len"], r["sig"])
    p.op(OP_TIDADDR, m["tid_address"])
    if m["robust_list"]["head"]:
        p.op(OP_ROBUST, m["robust_list"]["head"], m["robust_list"]["len"])
    mm_index = len(p.ops)
    p.op(OP_MM_MAP, 0, 104)                        # address patched below
    comm = m["process"].get("comm", "").encode()[:15]
    comm_index = len(p.ops)
    if comm:
        p.op(OP_PRCTL, 15, 0)                      # PR_SET_NAME; address patched below
    # a warm ghost (cxlfork.ghosts) runs everything above when it is spawned, then waits here
    # for the clone's own fds (stdio, files, pipes..., the error and go pipes)
    if huge and not lazy and not prefault:
        for addr, nbytes in huge_blocks(populate):
            p.op(OP_MADVISE, addr, nbytes, MADV_POPULATE_READ)
    if warm_sock is not None:
        for addr, nbytes, _ in populate if prefault else ():
            p.op(OP_MADVISE, addr, nbytes, MADV_POPULATE_READ)
        for addr, nbytes in populate_write if prefault else ():
            p.op(OP_MADVISE, addr, nbytes, MADV_POPULATE_WRITE)
        p.op(OP_GHOSTWAIT, warm_sock)
    if "uffd_sock" in fdnums:
        p.op(OP_UFFD_OPEN, UFFD_FEATURES)
        for addr, nbytes, _ in uffd_runs(m, policy, lazy, hot):
            p.op(OP_UFFD_REG, addr, nbytes)
        p.op(OP_UFFD_SEND, fdnums["uffd_sock"])
    # timers: created and armed per clone (after a warm ghost's wait), with the times left
    _timer_ops(p, m.get("timers"))
    _epoll_ops(p, m)
    # signals pending at the checkpoint, queued again by the clone to itself (siginfo records
    # after the thread records; addresses patched below)
    sigs = pending.records(m)
    sig_ops = []
    for _, private in sigs:
        sig_ops.append(len(p.ops))
        p.op(OP_SIGQUEUE, 0, 1 if private else 0)
    from cxlfork.procfs import RLIMITS
    for name, (soft, hard) in sorted(m["rlimits"].items()):
        p.op(OP_PRLIMIT, RLIMITS[name], soft, hard)
    # locks, under the clone's own RLIMIT_MEMLOCK (just set): mlock2 per locked mapping
    # (MLOCK_ONFAULT as it had), then mlockall(MCL_FUTURE[|MCL_ONFAULT]) for its later ones
    for v in m["vmas"]:
        if v.get("lock"):
            p.op(OP_MLOCK, v["start"], v["end"] - v["start"], 1 if v["lock"] == 2 else 0)
    if m.get("mlockall"):
        p.op(OP_MLOCKALL, m["mlockall"])
    for fd in fdnums.get("cloexec", []):
        p.op(OP_CLOEXEC, fd)
    threads = m.get("threads", [])
    thread_ops = []
    if "go" in fdnums:
        p.op(OP_WAITGO, fdnums["go"])             # cxlfork is attached from here on
        if threads:
            for i in range(len(threads)):
                thread_ops.append(len(p.ops))
                p.op(OP_THREAD, 0)                # record address patched below
            p.op(OP_WAITGO, fdnums["go"])         # every thread is parked
    # the credentials last: everything above may need the restorer's privilege (mappings of
    # files, mlock, rlimits, clone3 set_tid of the threads); each thread took them already
    from cxlfork.state import creds as creds_mod
    if creds is None:
        creds = creds_mod.check_restorable(m, "the image")
    creds_index = len(p.ops)
    p.op(OP_CREDS, 0)                             # record address patched below
    # the restorer's own fds are numbered above the process's, the error pipe first: close
    # every fd above it, then the error pipe (its EOF tells cxlfork the plan is done)
    p.op(OP_CLOSEFROM, fdnums["err"] + 1)
    p.op(OP_CLOSE, fdnums["err"])
    # the blocked mask is installed by cxlfork (PTRACE_SETSIGMASK) at the hand-over stop

    if len(specials) > 4:
        raise ValueError("too many special mappings")
    ops_off = HDR_WORDS * 8
    auxv = base64.b64decode(m["mm"]["auxv"])
    auxv_off = ops_off + len(p.ops) * 64
    mm_off = auxv_off + ((len(auxv) + 15) // 16) * 16
    creds_rec = creds_mod.record(creds, creds_mod.steps(creds))
    creds_off = mm_off + 112
    threads_off = creds_off + len(creds_rec)
    p.ops[creds_index] = (OP_CREDS, PLAN_ADDR + creds_off, 0, 0, 0, 0, 0, 0)
    mmf = m["mm"]
    mm_struct = struct.pack("<11QQII", *(mmf[k] for k in (
        "start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
        "arg_start", "arg_end", "env_start", "env_end")), PLAN_ADDR + auxv_off, len(auxv),
        fdnums["exe"])
    p.ops[mm_index] = (OP_MM_MAP, PLAN_ADDR + mm_off, len(mm_struct), 0, 0, 0, 0, 0)
    records = b""
    for i, (k, t) in enumerate(zip(thread_ops, threads)):
        # its checkpointed tid, given back when the clone has the checkpointed PID
        p.ops[k] = (OP_THREAD, PLAN_ADDR + threads_off + i * THREAD_REC, t["tid"],
                    m["process"]["pid"], 0, 0, 0, 0)
        alt, rseq, rl = t["altstack"], t["rseq"] or {"addr": 0, "len": 0, "sig": 0}, \
            t["robust_list"]
        records += struct.pack("<10Q16sQ", alt["sp"], alt["flags"] & 0xFFFFFFFF, alt["size"],
                               rseq["addr"], rseq["len"], rseq["sig"], t["tid_address"],
                               rl["head"], rl["len"], i, t.get("comm", "").encode()[:15],
                               PLAN_ADDR + creds_off)
    sig_off = threads_off + len(records)
    for k, (si, private) in zip(sig_ops, sigs):
        p.ops[k] = (OP_SIGQUEUE, PLAN_ADDR + sig_off, 1 if private else 0, 0, 0, 0, 0, 0)
        records += si
        sig_off += len(si)
    vdso = next((a for a, _, name in specials if name == "[vdso]"), 0)
    hdr = [PLAN_MAGIC, PLAN_VERSION, len(p.ops), ops_off, len(specials), vdso]
    for j in range(4):
        hdr += list(specials[j][:2]) if j < len(specials) else [0, 0]
    hdr += [fdnums["err"], REGION_LO, REGION_HI]
    hdr += [0] * (HDR_WORDS - len(hdr))
    body = struct.pack(f"<{HDR_WORDS}Q", *hdr)
    body += b"".join(struct.pack("<8Q", *o) for o in p.ops)
    body += auxv + b"\0" * (mm_off - auxv_off - len(auxv)) + mm_struct
    body += b"\0" * (creds_off - mm_off - len(mm_struct)) + creds_rec + records
    if comm:                                       # the name, NUL-padded to 16 bytes
        p_comm = PLAN_ADDR + len(body)
        body += comm + b"\0" * (16 - len(comm))
        body = body[:ops_off + comm_index * 64] + struct.pack("<8Q", OP_PRCTL, 15, p_comm,
                                                              0, 0, 0, 0, 0) + \
            body[ops_off + (comm_index + 1) * 64:]
    return body
