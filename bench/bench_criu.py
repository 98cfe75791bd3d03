"""CRIU side by side with cxlfork (part of bench_cxlfork.py; alone: bench_cxlfork.py --criu).

For each size, the same numpy worker (tests/cxlfork_progs/worker.py) two times, one for each
tool, measured alternating in one run (so both see the same load; which tool goes first
alternates, and each tool's images are removed before the other's turn), medians of --runs:

  checkpoint  `cxlfork checkpoint PID` (whole command: interpreter start included) and the
              API call (cxlfork.checkpoint.checkpoint) / `criu dump -t PID --leave-running`
              (images on a tmpfs, whole command); and each command's CPU time (user +
              system, from the rusage of children: steadier than wall time on a loaded
              machine; criu's parasite runs in the dumped process and is not counted)
  restore     `cxlfork restore IMAGE --detach` (mow) / `criu restore --restore-detached`:
              from the command's start to the restored process answering "pong" on its pipe
  full read   the restored process reads its whole array (the worker's "read" request), next
              to the original worker's own read of its anonymous memory

CRIU restores a process under its original PID, so its original is killed after each dump
and the restored process is the one dumped next (its stdin/stdout are pipes of this process,
handed over with --inherit-fd). A criu binary is looked for on PATH and in
/var/cache/tiermem/criu/sbin (`make criu` builds CRIU 4.2 there); one that fails `criu check`
(Debian bookworm's 3.17 on this kernel) is reported, not used.
"""
from __future__ import annotations

import ctypes
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE_BIN = "/var/cache/tiermem/criu/sbin/criu"
PR_SET_CHILD_SUBREAPER = 36


def find_criu() -> tuple[str | None, str]:
    """(path of a working criu, its version) or (None, why none is used)."""
    tried = []
    for c in (shutil.which("criu"), CACHE_BIN):
        if not c or not os.access(c, os.X_OK) or c in (t[0] for t in tried):
            continue
        ver = subprocess.run([c, "--version"], capture_output=True, text=True).stdout
        ver = next((ln.split(":", 1)[1].strip() for ln in ver.splitlines()
                    if ln.startswith("Version")), "?")
        r = subprocess.run([c, "check"], capture_output=True, text=True)
        if r.returncode == 0:
            return c, ver
        err = next((ln for ln in (r.stderr + r.stdout).splitlines() if "Error" in ln), "")
        tried.append((c, f"{c} ({ver}) fails 'criu check': {err.strip()[:80]}"))
    if not tried:
        return None, "no criu on PATH or in /var/cache/tiermem/criu (make criu)"
    return None, "; ".join(t[1] for t in tried)


def _readline(fd: int, timeout=120.0) -> str:
    """bench_cxlfork.readline (one line from a worker's pipe, with a timeout)."""
    from bench_cxlfork import readline
    return readline(fd, timeout)


class Proc:
    """A worker (or a restored one) with its stdin/stdout pipes on this side."""

    def __init__(self, pid: int, to_fd: int, from_fd: int, popen=None):
        self.pid, self.to_fd, self.from_fd, self.popen = pid, to_fd, from_fd, popen

    def ask(self, cmd: str) -> str:
        os.write(self.to_fd, cmd.encode() + b"\n")
        return _readline(self.from_fd)

    def timed(self, cmd: str, want: str) -> float:
        t0 = time.perf_counter()
        got = self.ask(cmd)
        dt = time.perf_counter() - t0
        assert got == want, got
        return dt

    def pipe_inodes(self) -> tuple[int, int]:
        """Inodes of the worker's stdin and stdout pipes."""
        return os.fstat(self.to_fd).st_ino, os.fstat(self.from_fd).st_ino

    def kill(self):
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass
        if self.popen is not None:
            self.popen.wait()
        else:
            try:
                os.waitpid(self.pid, 0)          # ours as the child subreaper
            except ChildProcessError:
                while os.path.exists(f"/proc/{self.pid}"):
                    time.sleep(0.001)
        for fd in (self.to_fd, self.from_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def start(mib: int, env: dict) -> Proc:
    """The bench's numpy worker, stderr to /dev/null (criu then reopens it as a file)."""
    worker = os.path.join(ROOT, "tests", "cxlfork_progs", "worker.py")
    p = subprocess.Popen([sys.executable, worker, str(mib)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True,
                         env=env, start_new_session=True)
    w = Proc(p.pid, os.dup(p.stdin.fileno()), os.dup(p.stdout.fileno()), p)
    p.stdin.close()
    p.stdout.close()
    assert _readline(w.from_fd) == "ready"
    return w


CPU = {}                                     # CPU seconds of the last command, by its name


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(cmd: list[str], what: str, **kw) -> None:
    """Run cmd; its CPU time (user + system of the command and the children it waited for)
    goes to CPU[what]."""
    c0 = _children_cpu()
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    CPU[what.split(" of ")[0]] = _children_cpu() - c0
    if r.returncode != 0:
        tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"{what} failed (exit {r.returncode}): {tail}")


def criu_dump(criu: str, w: Proc, d: str) -> float:
    t0 = time.perf_counter()
    _run([criu, "dump", "-t", str(w.pid), "-D", d, "--leave-running", "-o", "dump.log"],
         f"criu dump of {w.pid}")
    return time.perf_counter() - t0


def criu_restore(criu: str, w: Proc, d: str) -> tuple[Proc, float]:
    """Kill the original w, restore it from d with new pipes; (restored, seconds from the
    command's start to its first 'pong')."""
    ino_in, ino_out = w.pipe_inodes()
    w.kill()
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    pidfile = os.path.join(d, "restored.pid")
    t0 = time.perf_counter()
    _run([criu, "restore", "-D", d, "--restore-detached", "--pidfile", pidfile,
          "-o", "restore.log",
          "--inherit-fd", f"fd[{in_r}]:pipe:[{ino_in}]",
          "--inherit-fd", f"fd[{out_w}]:pipe:[{ino_out}]"],
         "criu restore", pass_fds=(in_r, out_w))
    os.close(in_r)
    os.close(out_w)
    pid = int(open(pidfile).read())
    r = Proc(pid, in_w, out_r)
    assert r.ask("ping") == "pong"
    return r, time.perf_counter() - t0


def cxlfork_checkpoint_cli(w: Proc, img: str, store: str) -> float:
    t0 = time.perf_counter()
    _run([sys.executable, "-m", "cxlfork", "checkpoint", str(w.pid), "-o", img, "--store",
          store], "cxlfork checkpoint", cwd=ROOT)
    return time.perf_counter() - t0


def cxlfork_restore_cli(img: str) -> tuple[Proc, float]:
    """`cxlfork restore IMAGE --detach` (mow) with this process's pipes as the clone's
    stdio; (clone, seconds from the command's start to its first 'pong')."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    pidfile = img + ".pid"
    t0 = time.perf_counter()
    c = subprocess.Popen([sys.executable, "-m", "cxlfork", "restore", img, "--detach",
                          "--pidfile", pidfile], stdin=in_r, stdout=out_w,
                         stderr=subprocess.DEVNULL, close_fds=True, cwd=ROOT)
    os.close(in_r)
    os.close(out_w)
    os.write(in_w, b"ping\n")
    # two lines in either order: the PID line of --detach and the clone's pong (one write
    # each, written by two processes)
    got = [_readline(out_r)]
    if got[0] != "pong":
        got.append(_readline(out_r))
    dt = time.perf_counter() - t0
    c.wait()
    pid = int(open(pidfile).read())
    os.unlink(pidfile)
    clone = Proc(pid, in_w, out_r)
    if "pong" not in got:
        clone.kill()
        raise RuntimeError(f"cxlfork restore: no pong from the clone (got {got})")
    if len(got) == 1:
        _readline(out_r)                     # the PID line, after the pong
    return clone, dt


def side_by_side(mib: int, runs: int, store: str, env: dict, criu: str) -> dict:
    """Medians (seconds) of the alternating runs for one size."""
    from cxlfork import image as image_mod
    from cxlfork.checkpoint import checkpoint
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)     # criu's restored processes come to us
    imgs = tempfile.mkdtemp(prefix="criu-bench-", dir="/dev/shm")    # tmpfs
    work = tempfile.mkdtemp(prefix="cxlfork-criu-bench-", dir="/dev/shm")   # tmpfs too
    cw = start(mib, env)
    xw = start(mib, env)
    t = {k: [] for k in ("criu_dump", "criu_restore", "criu_read", "cx_ckpt_cli", "cx_ckpt_api",
                         "cx_restore_cli", "cx_read", "anon_read", "criu_mib", "criu_dump_cpu",
                         "cx_ckpt_cpu")}
    def cxlfork_run(k):
        img = os.path.join(work, f"x{k}")
        t["cx_ckpt_cli"].append(cxlfork_checkpoint_cli(xw, img, store))
        t["cx_ckpt_cpu"].append(CPU["cxlfork checkpoint"])
        clone, dt = cxlfork_restore_cli(img)
        t["cx_restore_cli"].append(dt)
        t["cx_read"].append(clone.timed("read", "done"))
        clone.kill()
        image_mod.remove(img)
        api = os.path.join(work, f"a{k}")
        t["cx_ckpt_api"].append(checkpoint(xw.pid, api, store)["total_s"])
        image_mod.remove(api)
        assert xw.ask("ping") == "pong"

    def criu_run(k):
        nonlocal cw
        d = os.path.join(imgs, str(k))
        os.mkdir(d)
        t["criu_dump"].append(criu_dump(criu, cw, d))
        t["criu_dump_cpu"].append(CPU["criu dump"])
        t["criu_mib"].append(sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)
                                 if f.startswith("pages-")) / 2**20)
        cw, dt = criu_restore(criu, cw, d)
        t["criu_restore"].append(dt)
        t["criu_read"].append(cw.timed("read", "done"))
        shutil.rmtree(d)

    try:
        for k in range(runs):
            t["anon_read"].append(xw.timed("read", "done"))
            # each tool's images are removed before the other's run (both find the same free
            # memory), and which goes first alternates
            for one in ((cxlfork_run, criu_run) if k % 2 == 0 else (criu_run, cxlfork_run)):
                one(k)
    finally:
        cw.kill()
        xw.kill()
        shutil.rmtree(imgs, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return {k: statistics.median(v) for k, v in t.items() if v}


def table(rows: list[tuple[int, dict]], runs: int, criu: str, version: str) -> str:
    hdr = ("state", "criu dump", "cxlfork ckpt", "ckpt API", "ckpt/dump", "dump CPU",
           "ckpt CPU", "criu restore",
           "cxlfork restore", "criu full read", "clone full read", "anon full read",
           "clone/anon")
    out = [f"\nCRIU {version} ({criu}) side by side, alternating in one run, medians of {runs}; "
           f"whole commands (interpreter start included); both images on tmpfs; load average "
           f"{os.getloadavg()[0]:.1f}"]
    out.append(" | ".join(f"{h:>15s}" for h in hdr))
    for mib, m in rows:
        vals = (f"{mib} MiB", f"{m['criu_dump'] * 1e3:.0f} ms", f"{m['cx_ckpt_cli'] * 1e3:.0f} ms",
                f"{m['cx_ckpt_api'] * 1e3:.0f} ms", f"{m['cx_ckpt_cli'] / m['criu_dump']:.2f}x",
                f"{m['criu_dump_cpu'] * 1e3:.0f} ms", f"{m['cx_ckpt_cpu'] * 1e3:.0f} ms",
                f"{m['criu_restore'] * 1e3:.0f} ms", f"{m['cx_restore_cli'] * 1e3:.0f} ms",
                f"{m['criu_read'] * 1e3:.1f} ms", f"{m['cx_read'] * 1e3:.1f} ms",
                f"{m['anon_read'] * 1e3:.1f} ms", f"{m['cx_read'] / m['anon_read']:.2f}x")
        out.append(" | ".join(f"{v:>15s}" for v in vals))
    return "\n".join(out)


def run(sizes, runs: int, store: str, env: dict) -> str:
    criu, version = find_criu()
    if criu is None:
        return f"\nCRIU side by side: skipped: {version}"
    rows = []
    for mib in sizes:
        print(f"... criu side by side, {mib} MiB", file=sys.stderr, flush=True)
        rows.append((mib, side_by_side(mib, runs, store, env, criu)))
    return table(rows, runs, criu, version)
