"""Conformance: one small C program per kind of state (tests/cxlfork_progs/*.c). Each is
checkpointed while blocked in read(2), restored with the real `cxlfork restore`, and checks
itself (prints "ok"). The original, left running, must pass the same checks afterwards."""
from __future__ import annotations

import os
import tempfile

import pytest

from cxlfork_util import wait_file, build_prog, cxlfork, go, new_store, restore_popen, rmtree, start

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, PR_SET_MM_MAP)")


@pytest.fixture(scope="module")
def env():
    d = tempfile.mkdtemp(prefix="cxlfork-conf-")
    s = new_store()
    yield d, s
    rmtree(d)
    rmtree(s)


def _roundtrip(env, prog, policy="mow", args=(), extra=()):
    d, store = env
    exe = build_prog(prog, d)
    work = tempfile.mkdtemp(dir=d)
    orig = start([exe, *[a.format(work=work) for a in args]], cwd=d)
    img = os.path.join(d, f"{prog}-{policy}{''.join(extra)}.img")
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        pidfile = img + ".pids"
        clone = restore_popen(img, "--policy", policy, *extra, "--pidfile", pidfile)
        # the clone is restored (and blocked in its read) before the original goes on and,
        # e.g., unlinks a file both have mapped
        wait_file(pidfile, clone)
        out, rc, _ = go(orig)
        assert out.strip() == "ok" and rc == 0, f"original after checkpoint: {out!r} rc={rc}"
        out, rc, err = go(clone)
        if "--detach" in extra:        # the command printed the PIDs and exited 0
            pids, _, out = out.partition("\n")
            assert pids.strip() == wait_file(pidfile, clone).strip()
        assert out.strip() == "ok" and rc == 0, f"clone: {out!r} rc={rc} {err}"
    finally:
        if orig.poll() is None:
            orig.kill()
            orig.wait()
        cxlfork("rm", img, check=False)


@pytest.mark.parametrize("prog", ["mem", "regs", "sig", "misc"])
def test_state_survives_mow(env, prog):
    _roundtrip(env, prog)


def test_fds_cwd_umask_rlimits(env):
    _roundtrip(env, "fds", args=["{work}"])


@pytest.mark.parametrize("policy", ["mow", "moa"])
def test_socketpairs(env, policy):
    """AF_UNIX socketpairs (stream, dgram, seqpacket) with queued data both ways."""
    _roundtrip(env, "sockets", policy)


@pytest.mark.parametrize("policy", ["moa", "moa --eager", "hybrid"])
def test_memory_other_policies(env, policy):
    """moa is lazy (userfaultfd, first touch) unless --eager."""
    _roundtrip(env, "mem", policy.split()[0], extra=policy.split()[1:])


@pytest.mark.parametrize("policy", ["mow", "moa"])
def test_threads(env, policy):
    _roundtrip(env, "threads", policy)


@pytest.mark.parametrize("policy", ["mow", "moa --eager", "moa"])
def test_pids_and_tids_in_new_pid_namespace(env, policy):
    """--pidns new: the clone and its threads read their checkpointed PID and tids
    (getpid, gettid) and pthread_kill reaches the right thread; the original too."""
    pol, *rest = policy.split()
    _roundtrip(env, "pidtid", pol, extra=(*rest, "--pidns", "new"))


@pytest.mark.parametrize("policy", ["mow", "moa --eager"])
def test_process_tree(env, policy):
    """A parent and two forked children sharing two pipes, checkpointed whole and restored in
    a new PID namespace: the children are the parent's (getppid), under the PIDs fork
    returned (kill, waitpid with their exit status), with their own memory; the pipes are
    shared across the tree. The original tree passes the same checks."""
    pol, *rest = policy.split()
    _roundtrip(env, "tree", pol, extra=(*rest, "--pidns", "new"))


@pytest.mark.parametrize("prog", ["regs", "sig", "misc"])
def test_state_survives_lazy_moa(env, prog):
    _roundtrip(env, prog, "moa")


POLICIES = ["mow", "moa", "moa --eager", "hybrid"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("prog,args", [("pipeofd", ()), ("memfdmode", ()), ("rseqsig", ()),
                                       ("maywrite", ("{work}",)), ("timers", ()),
                                       ("mlocked", ()), ("itimers", ()), ("rseqabort", ())])
def test_restored_right_not_just_restored(env, prog, args, policy):
    """Issue 13's "restores successfully but wrong": two open file descriptions of one pipe
    keep their own O_NONBLOCK; a memfd keeps its mode; rseq keeps its signature; a read-only
    shared file mapping that may become writable still can; POSIX and interval timers are
    carried over (timers: the periodic one must keep firing in the clone; itimers: the interval
    timers alone); an rseq critical section aborted in the clone reaches its abort handler
    (a lost signature would kill the clone with SIGSEGV); mlock()ed anonymous and file memory
    stays locked with its contents."""
    _roundtrip(env, prog, policy.split()[0], args=args, extra=policy.split()[1:])


@pytest.mark.parametrize("prog,mode,want", [
    ("timerrefuse", "thread", "POSIX timer ID 0 of PID {pid} signals thread"),
    ("timerrefuse", "cpu", "POSIX timer ID 0 of PID {pid} runs on clock"),
    ("seccomp", "", "PID {pid} runs under seccomp (1 seccomp filter(s))")])
def test_refused_with_a_line(env, prog, mode, want):
    """What cannot be carried is refused at checkpoint with one error line naming it, not
    dropped: timers that signal another thread or run on a CPU-time clock, a seccomp filter.
    Nothing is published and the process goes on."""
    d, store = env
    exe = build_prog(prog, d)
    orig = start([exe, mode] if mode else [exe], cwd=d)
    want = want.format(pid=orig.pid)
    img = os.path.join(d, f"{prog}-{mode}.img")
    try:
        r = cxlfork("checkpoint", orig.pid, "-o", img, "--store", store, check=False)
        errors = [x for x in r.stderr.splitlines() if x.startswith("cxlfork: error:")]
        assert r.returncode == 1 and len(errors) == 1, r.stderr
        assert want in errors[0], r.stderr
        assert not os.path.exists(img)
        out, rc, _ = go(orig)
        assert out.strip() == "ok" and rc == 0, out
    finally:
        if orig.poll() is None:
            orig.kill()
            orig.wait()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("prog", ["epoll", "timerfd", "signalfd", "inotify", "fifo", "deleted",
                                  "deletedmap", "pending"])
def test_event_and_timer_fds(env, prog, policy):
    """Issue 13 part 2: epoll interest lists (LT, EPOLLET, EPOLLONESHOT, EPOLLEXCLUSIVE, data,
    epoll in epoll, a dup as target; MOD/DEL by the old fd numbers), timerfds (every clock,
    time left, interval, TFD_TIMER_ABSTIME, pending expirations), signalfds (masks, flags),
    inotify watches (same wds with a gap, masks), named FIFOs, deleted-but-open files
    (contents, offsets, flags) and mappings of deleted files (shm_unlink'ed POSIX shm shared
    with its fd, a private mapping with a copied page) and signals pending at the checkpoint
    (process and main-thread queues, with their siginfo) survive, each checked by the program
    itself."""
    _roundtrip(env, prog, policy.split()[0], args=("{work}",), extra=policy.split()[1:])


@pytest.mark.parametrize("mode,want", [
    ("fanotify", "fd 5 is a fanotify fd"),
    ("epollclosed", "epoll fd 5 of PID {pid}: its interest entry for fd 3"),
    ("threadpending", "of PID {pid} has signal 10 pending for itself alone"),
    ("inotifyqueued", "inotify fd 5 of PID {pid} has 16 bytes of events not yet read"),
    ("inotifygone", "inotify fd 5 of PID {pid}, watch descriptor 1: the watched inode"),
    ("fifogone", "fd 5 is a deleted named FIFO")])
def test_event_fds_refused_with_a_line(env, mode, want):
    """What stays unsupported among event fds is refused at checkpoint with one line naming
    it; nothing is published and the process goes on, neither stopped nor traced."""
    d, store = env
    exe = build_prog("evrefuse", d)
    orig = start([exe, mode, d], cwd=d)
    want = want.format(pid=orig.pid)
    img = os.path.join(d, f"evrefuse-{mode}.img")
    try:
        r = cxlfork("checkpoint", orig.pid, "-o", img, "--store", store, check=False)
        errors = [x for x in r.stderr.splitlines() if x.startswith("cxlfork: error:")]
        assert r.returncode == 1 and len(errors) == 1, r.stderr
        assert want in errors[0], r.stderr
        assert "Traceback" not in r.stderr
        assert not os.path.exists(img)
        with open(f"/proc/{orig.pid}/status") as f:
            st = dict(line.split(":", 1) for line in f if ":" in line)
        assert st["TracerPid"].strip() == "0", st["TracerPid"]
        assert st["State"].split()[0] in ("S", "R"), st["State"]
        out, rc, _ = go(orig)
        assert out.strip() == "ok" and rc == 0, out
    finally:
        if orig.poll() is None:
            orig.kill()
            orig.wait()


def test_fifo_with_bytes_refused_on_kill(env):
    """checkpoint --kill of a process whose named FIFO holds bytes is refused (they stay in
    the FIFO, not in the image); without --kill the same process checkpoints."""
    d, store = env
    exe = build_prog("fifobytes", d)
    work = tempfile.mkdtemp(dir=d)
    orig = start([exe, work], cwd=d)
    img = os.path.join(d, "fifobytes.img")
    try:
        r = cxlfork("checkpoint", orig.pid, "-o", img, "--store", store, "--kill", check=False)
        errors = [x for x in r.stderr.splitlines() if x.startswith("cxlfork: error:")]
        assert r.returncode == 1 and len(errors) == 1, r.stderr
        assert f"is the named FIFO {work}/fifo with 3 bytes buffered" in errors[0], r.stderr
        assert not os.path.exists(img) and orig.poll() is None
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        out, rc, _ = go(orig)
        assert out.strip() == "ok" and rc == 0, out
    finally:
        if orig.poll() is None:
            orig.kill()
            orig.wait()
        cxlfork("rm", img, check=False)


@pytest.mark.parametrize("prog,change,want", [
    ("inotify", lambda w: (os.rename(f"{w}/d1", f"{w}/d1.old"), os.mkdir(f"{w}/d1")),
     "inotify watch 1: {work}/d1 is not the file it was at the checkpoint"),
    ("fifo", lambda w: os.unlink(f"{w}/fifo1"), "named FIFO {work}/fifo1: No such file")])
def test_event_fds_restore_refuses_changed_paths(env, prog, change, want):
    """A watched path replaced, or a FIFO gone, after the checkpoint: the restore fails with
    one line naming it, and no clone is left."""
    import psutil
    d, store = env
    exe = build_prog(prog, d)
    work = tempfile.mkdtemp(dir=d)
    orig = start([exe, work], cwd=d)
    img = os.path.join(d, f"{prog}-changed.img")
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        change(work)
        r = cxlfork("restore", img, "--stdio", "null", check=False)
        errors = [x for x in r.stderr.splitlines() if x.startswith("cxlfork: error:")]
        assert r.returncode == 1 and len(errors) == 1, r.stderr
        assert want.format(work=work) in errors[0], r.stderr
        assert "Traceback" not in r.stderr
        left = [p.pid for p in psutil.process_iter(["exe"]) if p.info["exe"] == exe]
        assert left == [orig.pid], left
    finally:
        if orig.poll() is None:
            orig.kill()
            orig.wait()
        cxlfork("rm", img, check=False)


@pytest.mark.parametrize("policy", POLICIES)
def test_anonymous_semantics(env, policy):
    """Issue 13 part 4: restored anonymous pages behave as anonymous memory (anonsem.c, whose
    original, run on after the checkpoint, is the reference on plain anonymous memory):
    MADV_DONTNEED gives zeros (also over pages written since the restore, and at a range's
    new place after mremap), MADV_FREE succeeds and writes after it stick, MADV_REMOVE fails
    with EINVAL, mremap keeps contents and grows with zeros."""
    _roundtrip(env, "anonsem", policy.split()[0], extra=policy.split()[1:])


def test_anonymous_semantics_detached(env):
    """restore --detach of a mow clone: the command exits at once and the process it leaves
    behind serves the clone's userfaultfd, so the clone's checks still pass."""
    _roundtrip(env, "anonsem", "mow", extra=["--detach"])


def test_checkpoint_of_a_clone_refused(env):
    """A mow clone's store-mapped anonymous runs are registered with cxlfork's userfaultfd
    (dropped pages are zeros only through its handler): checkpointing the clone is refused
    with one line naming that memory (before, the image silently took the store's bytes for
    dropped pages), and the clone goes on."""
    d, store = env
    exe = build_prog("anonsem", d)
    orig = start([exe], cwd=d)
    img = os.path.join(d, "anonsem-cc.img")
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        clone = restore_popen(img, "--pidfile", img + ".pids")
        pid = int(wait_file(img + ".pids", clone))
        r = cxlfork("checkpoint", pid, "-o", img + "2", "--store", store, check=False)
        errors = [x for x in r.stderr.splitlines() if x.startswith("cxlfork: error:")]
        assert r.returncode == 1 and len(errors) == 1, r.stderr
        assert "userfaultfd-registered memory (in a cxlfork clone" in errors[0], r.stderr
        assert not os.path.exists(img + "2")
        out, rc, err = go(clone)
        assert out.strip() == "ok" and rc == 0, f"clone: {out!r} rc={rc} {err}"
    finally:
        if orig.poll() is None:
            orig.kill()
            orig.wait()
        cxlfork("rm", img, check=False)


@pytest.fixture(scope="module")
def huge_env(env):
    """A store on a tmpfs with 2 MiB folios (huge=within_size, as the default store)."""
    import subprocess
    d, _ = env
    s = tempfile.mkdtemp(prefix="cxlfork-test-hstore-", dir="/dev/shm")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700,huge=within_size",
                    "cxlfork-test-huge", s], check=True)
    yield d, s
    subprocess.run(["umount", s], check=False)
    rmtree(s)


@pytest.mark.parametrize("policy", ["mow", "hybrid", "moa", "moa --eager"])
def test_anonymous_semantics_pmd_mapped(huge_env, policy):
    """A 2 MiB-aligned state on a store with 2 MiB folios (anonhuge.c): under mow (and
    hybrid without a record) its blocks come back PMD-mapped (the program checks
    ShmemPmdMapped), and dropping a page in a block, writing one, dropping or moving a whole
    block, and a forked child's MADV_DONTNEED behave as on anonymous memory (the original is
    the reference); lazy and eager moa copy, and pass the same checks."""
    pmd = ("pmd",) if policy in ("mow", "hybrid") else ()
    _roundtrip(huge_env, "anonhuge", policy.split()[0], args=pmd, extra=policy.split()[1:])


def test_anonymous_semantics_on_huge_store(huge_env):
    """anonsem.c's checks (small ranges, page by page) on a store with 2 MiB folios."""
    _roundtrip(huge_env, "anonsem", "mow")
