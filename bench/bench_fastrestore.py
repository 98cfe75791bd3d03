"""Fast restores (issue 13's figures): the `cxlfork restore` command, and a mow clone's first
full read against anonymous memory, each side by side with its baseline in the same run
(medians of --runs, runs alternating).

Table 1, the restore command (the bench's numpy worker, 256 MiB by default, --cmd-mib):
"old CLI" = `python -m cxlfork restore IMAGE --detach --pidfile F` (interpreter start,
imports, one-shot restore); "service" = `cxlfork-restore` with the same arguments, served by
a `cxlfork service` this bench starts (its cache warm: the steady state for an image
restored again and again; "first" = its first request for the image, cold); "no service" =
`cxlfork-restore` with no service listening (it runs the Python command). "exit" = exec of
the command to its exit; "pong" = exec to the clone answering a ping on the command's
stdin/stdout; "CPU" = CPU time of everything the command made run until it exited (client
or interpreter, the service's request process, restorer, clone, and the service itself:
each measured in a cpuacct cgroup of its own, which the service's request process joins as
the caller's), the figure that does not depend on how busy the machine is. The clock starts in the spawned
child just before its exec, after it joined its cpuacct cgroup: that join (a cgroup
migration, 5-10 ms here) and the bench's own fork are the harness's, not the command's.

Table 2, first full read (64/256/1024 MiB, --sizes): "anon" = the original worker reading
its own resident anonymous memory (numpy reduces the whole array); "eager clone" = a
moa --eager clone (its state copied into anonymous memory at restore, as CRIU restores it)
reading it for the first time, the same request in the same situation as the mow clones;
"ratio" = against the faster of the two anonymous reads; "mow before" = a prepared
mow restore without the huge prefault (prepare_restore(huge=False): each first-touched MiB
is a round trip to the userfaultfd handler, mapping 4 KiB PTEs; the behaviour before this
change); "mow huge" = the default now (huge-aligned blocks prefaulted with PMDs at restore);
"restore" = Prepared.restore() to the clone's first pong, the cost side. Each read is shown
as wall time and, after "/", CPU time (schedstat, ns): the reading thread's, plus for clones
every thread of this bench's process (the userfaultfd handler runs here, and the bench
waits in a read meanwhile). On 2 cores shared by many jobs the wall time is mostly waiting
for a CPU; CPU time is the steadier figure. The store is a
tmpfs mounted like cxlfork's default store (huge=within_size).

Run as root:  .venv/bin/python bench/bench_fastrestore.py [--sizes 64,256,1024] [--runs 5]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from bench_cxlfork import Pipes, ask, kill_all, readline, start_worker  # noqa: E402
from cxlfork.checkpoint import checkpoint  # noqa: E402
from cxlfork.restore import prepare_restore  # noqa: E402
from cxlfork.store import cxl_node, mount_options  # noqa: E402

CLIENT = os.path.join(ROOT, "cxlfork", "native", "cxlfork-restore")


def med(xs) -> float:
    return statistics.median(xs) * 1e3


def on_cpu(pid: int) -> float:
    """Seconds the main thread of pid has run on a CPU (schedstat: ns precision)."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def self_cpu() -> float:
    """Seconds every thread of this process (the userfaultfd handler's among them) ran."""
    tot = 0
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/schedstat") as f:
                tot += int(f.read().split()[0])
        except OSError:
            pass
    return tot / 1e9


def one_read(p, pipes: Pipes) -> tuple[float, float, float]:
    """(restore to pong s, first full read s, its on-CPU s) of one clone of prepared
    restore p."""
    t0 = time.perf_counter()
    pid, = p.restore(1, stdio=pipes.fds())
    assert pipes.ask("ping") == "pong"
    t1 = time.perf_counter()
    c0, h0 = on_cpu(pid), self_cpu()
    assert pipes.ask("read") == "done"
    t2 = time.perf_counter()
    c1, h1 = on_cpu(pid), self_cpu()
    kill_all([pid])
    return t1 - t0, t2 - t1, c1 - c0 + h1 - h0


def reads(mib: int, runs: int, work: str, store: str) -> dict:
    w, _ = start_worker(mib)
    img = os.path.join(work, f"r{mib}.img")
    out: dict[str, list] = {"anon": [], "before": [], "huge": [], "eager": []}
    try:
        ask(w, "read")                              # resident before the reference reads
        for _ in range(runs):
            t, c = time.perf_counter(), on_cpu(w.pid)
            assert ask(w, "read") == "done"
            out["anon"].append((0.0, time.perf_counter() - t, on_cpu(w.pid) - c))
        checkpoint(w.pid, img, store, kill=True)
        w.wait()
        pipes = Pipes()
        with prepare_restore(img, "mow", huge=False) as before, \
                prepare_restore(img, "mow") as huge, \
                prepare_restore(img, "moa", eager=True) as eager:
            assert huge.huge and not before.huge, "the store has no 2 MiB folios"
            for i in range(runs):
                order = (("before", before), ("huge", huge), ("eager", eager))
                for name, p in order if i % 2 == 0 else order[::-1]:
                    out[name].append(one_read(p, pipes))
        pipes.close()
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
        shutil.rmtree(img, ignore_errors=True)
    return out


class CpuGroup:
    """A cpuacct (cgroup v1) or cgroup v2 directory of our own, for CPU time in ns."""

    def __init__(self, tag: str):
        self.path = None
        with open("/proc/self/cgroup") as f:
            lines = [ln.rstrip("\n").split(":", 2) for ln in f]
        for _, ctl, path in lines:
            base = None
            if "cpuacct" in ctl.split(","):
                base = f"/sys/fs/cgroup/{ctl}" + path
            elif ctl == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
                base = "/sys/fs/cgroup" + path
            if base and os.path.isdir(base):
                try:
                    self.path = os.path.join(base, f"bench-fast-{tag}-{os.getpid()}")
                    os.mkdir(self.path)
                    break
                except OSError:
                    self.path = None

    def join(self):
        if self.path:
            with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
                f.write("0")

    def ns(self) -> int:
        if not self.path:
            return 0
        if os.path.exists(os.path.join(self.path, "cpuacct.usage")):
            with open(os.path.join(self.path, "cpuacct.usage")) as f:
                return int(f.read())
        with open(os.path.join(self.path, "cpu.stat")) as f:
            return next(int(x.split()[1]) * 1000 for x in f if x.startswith("usage_usec"))

    def remove(self):
        if self.path:
            for _ in range(50):
                try:
                    os.rmdir(self.path)
                    return
                except OSError:
                    time.sleep(0.1)


def timed_command(argv: list[str], env: dict, pidfile: str, cg: CpuGroup,
                  svc_cg: CpuGroup) -> tuple[float, float, float]:
    """(exec to exit s, exec to the clone's pong s, CPU s) of one restore command
    (--detach). The clock starts in the child after it joined cg, just before its exec."""
    u0 = cg.ns() + svc_cg.ns()
    tr, tw = os.pipe()

    def start():
        cg.join()
        os.write(tw, struct.pack("d", time.perf_counter()))
    c = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         close_fds=True, env=env, preexec_fn=start)
    os.close(tw)
    t0 = struct.unpack("d", os.read(tr, 8))[0]
    os.close(tr)
    try:
        c.stdin.write(b"ping\n")
        c.stdin.flush()
        got = readline(c.stdout.fileno())            # the PID line and the pong, any order
        if "pong" not in got:
            got += readline(c.stdout.fileno())
        t_pong = time.perf_counter() - t0
        assert "pong" in got, got
        c.wait()
        t_exit = time.perf_counter() - t0
        cpu = (cg.ns() + svc_cg.ns() - u0) / 1e9
        assert c.returncode == 0
    finally:
        if c.poll() is None:
            c.kill()
            c.wait()
    with open(pidfile) as f:
        kill_all([int(x) for x in f.read().split()])
    os.unlink(pidfile)
    return t_exit, t_pong, cpu


def commands(mib: int, runs: int, work: str, store: str) -> dict:
    w, _ = start_worker(mib)
    img = os.path.join(work, f"c{mib}.img")
    sock = os.path.join(work, "restore.sock")
    pf = os.path.join(work, "pids")
    out: dict[str, list] = {"cli": [], "service": [], "first": [], "nosvc": []}
    svc = None
    cg, svc_cg = CpuGroup("cmd"), CpuGroup("svc")
    try:
        checkpoint(w.pid, img, store, kill=True)
        w.wait()
        svc = subprocess.Popen([sys.executable, "-m", "cxlfork", "service", "--socket", sock],
                               stdin=subprocess.DEVNULL, close_fds=True,
                               preexec_fn=svc_cg.join)
        t = time.monotonic()
        while not os.path.exists(sock):
            assert svc.poll() is None and time.monotonic() - t < 60, "service did not start"
            time.sleep(0.05)
        args = [img, "--detach", "--pidfile", pf]
        env_svc = dict(os.environ, CXLFORK_SERVICE="require", CXLFORK_SERVICE_SOCK=sock)
        env_no = dict(os.environ, CXLFORK_SERVICE_SOCK=os.path.join(work, "none.sock"))
        out["first"].append(timed_command([CLIENT, *args], env_svc, pf, cg, svc_cg))
        time.sleep(1.0)                             # the service warms its cache meanwhile
        for i in range(runs):
            order = [("cli", [sys.executable, "-m", "cxlfork", "restore", *args], os.environ),
                     ("service", [CLIENT, *args], env_svc),
                     ("nosvc", [CLIENT, *args], env_no)]
            for name, argv, env in order if i % 2 == 0 else order[::-1]:
                out[name].append(timed_command(argv, env, pf, cg, svc_cg))
    finally:
        if svc is not None:
            svc.send_signal(signal.SIGTERM)
            svc.wait(timeout=30)
        if w.poll() is None:
            w.kill()
            w.wait()
        shutil.rmtree(img, ignore_errors=True)
        cg.remove()
        svc_cg.remove()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,256,1024")
    ap.add_argument("--cmd-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", choices=["commands", "reads"], default=None)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_fastrestore: needs root (ptrace, PR_SET_MM_MAP, userfaultfd, mount)")
    if not os.access(CLIENT, os.X_OK):
        sys.exit(f"bench_fastrestore: {CLIENT} is not built (pip install -e .)")
    work = tempfile.mkdtemp(prefix="bench-fast-")
    store = tempfile.mkdtemp(prefix="bench-fast-store-")
    node, _ = cxl_node()
    subprocess.run(["mount", "-t", "tmpfs", "-o", mount_options(node), "cxlfork-bench", store],
                   check=True)
    try:
        if a.only != "reads":
            c = commands(a.cmd_mib, a.runs, work, store)
            print(f"`cxlfork restore` of the {a.cmd_mib} MiB worker (--detach --pidfile), "
                  f"medians of {a.runs} alternating runs, load average "
                  f"{os.getloadavg()[0]:.1f}")
            hdr = ("command", "exec -> exit", "exec -> pong", "exit vs old CLI", "CPU")
            print(" | ".join(f"{h:>30}" for h in hdr))
            base = med([x[0] for x in c["cli"]])
            for name, label in (("cli", "old CLI (python -m cxlfork)"),
                                ("service", "cxlfork-restore, service"),
                                ("first", "  same, first request (cold)"),
                                ("nosvc", "cxlfork-restore, no service")):
                e, p = med([x[0] for x in c[name]]), med([x[1] for x in c[name]])
                u = med([x[2] for x in c[name]])
                print(" | ".join(f"{x:>30}" for x in (label, f"{e:.1f} ms", f"{p:.1f} ms",
                                                      f"{e / base:.2f}x", f"{u:.1f} ms")))
            print(flush=True)
        if a.only != "commands":
            rows = []
            for mib in (int(x) for x in a.sizes.split(",")):
                print(f"... {mib} MiB", file=sys.stderr, flush=True)
                rows.append((mib, reads(mib, a.runs, work, store)))
            print(f"first full read of the state: a mow clone vs anonymous memory, medians "
                  f"of {a.runs} alternating runs, load average {os.getloadavg()[0]:.1f}")
            hdr = ("state", "anon original", "eager clone", "mow before", "ratio", "mow huge",
                   "ratio", "restore before", "restore huge")
            print(" | ".join(f"{h:>17}" for h in hdr))
            for mib, r in rows:
                def m(k, i):
                    return med([x[i] for x in r[k]])
                base = min(m("anon", 1), m("eager", 1))
                cbase = min(m("anon", 2), m("eager", 2))
                cells = [f"{mib} MiB"]
                for k in ("anon", "eager", "before", "huge"):
                    cells.append(f"{m(k, 1):.1f} / {m(k, 2):.1f} ms")
                    if k in ("before", "huge"):
                        cells.append(f"{m(k, 1) / base:.2f}x / {m(k, 2) / cbase:.2f}x")
                cells += [f"{m('before', 0):.2f} ms", f"{m('huge', 0):.2f} ms"]
                print(" | ".join(f"{x:>17}" for x in cells))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(["umount", store], check=False)
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
