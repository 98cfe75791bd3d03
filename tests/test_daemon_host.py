"""tiermemd as a service on this host (one NUMA node, so nothing is moved between tiers
here; tiering itself is tested in the emulated CXL machine, test_daemon_vm.py): start-up,
control socket ownership and peer-credential check, ctl verbs, metrics endpoint, SIGHUP
reload (bad config refused), SIGTERM clean-up, kill -9 recovery, one instance per state
directory, and the move_pages mover's per-page status handling."""
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from tiermem import native
from tiermem.movers import MOVERS, TargetGone, make_mover

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
WORKER = os.path.join(ROOT, "tests", "progs", "pattern_worker.py")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="tiermemd needs root")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


@pytest.fixture
def worker():
    p = subprocess.Popen([PY, WORKER, "16"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    info = json.loads(p.stdout.readline())
    yield p, info
    p.kill()
    p.wait()


def config(tmp_path, targets, port=None, extra="", sockdir=None):
    port = port or free_port()
    path = tmp_path / "d.toml"
    path.write_text(f"""[daemon]
interval = "200ms"
socket = "{sockdir or tmp_path}/ctl.sock"
state_dir = "{tmp_path}/state"
metrics = "127.0.0.1:{port}"
{extra}
{targets}""")
    return str(path), port


class D:
    def __init__(self, tmp_path, cfg, *args, sockdir=None):
        self.tmp = tmp_path
        self.sock = os.path.join(sockdir or tmp_path, "ctl.sock")
        self.log = tmp_path / f"d{time.monotonic_ns()}.log"
        self.p = subprocess.Popen([PY, "-m", "tiermemd", "-f", "-v", "-c", cfg, *args],
                                  stderr=open(self.log, "w"))
        for _ in range(400):        # serving (or failed): the log says so
            if self.p.poll() is not None or " serving: " in self.log.read_text():
                break
            time.sleep(0.05)

    def ctl(self, *args, user=None):
        from conftest import run_unprivileged
        argv = [PY, "-m", "tiermem.cli", "ctl", "--socket", self.sock, *args]
        if user:
            return run_unprivileged(argv, uid=int(user), capture_output=True, text=True,
                                    timeout=60)
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    def text(self):
        return self.log.read_text()

    def stop(self, sig=signal.SIGTERM):
        if self.p.poll() is None:
            self.p.send_signal(sig)
        return self.p.wait(30)


TARGET = """[[targets]]
name = "w"
cmdline = "pattern_worker.py 16"
policy = "first-touch"
"""


def test_serve_ctl_metrics_reload_stop(tmp_path, worker):
    wp, info = worker
    cfg, port = config(tmp_path, TARGET)
    d = D(tmp_path, cfg)
    try:
        sock = tmp_path / "ctl.sock"
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == 0
        time.sleep(1)
        r = d.ctl("status", "--json")
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        assert s["targets"][0]["pids"] == [info["pid"]] and s["pid"] == d.p.pid
        assert s["fast_nodes"] == [0]
        r = d.ctl("stats", "--json")
        stats = json.loads(r.stdout)
        t = stats["targets"]["w"]
        # the worker's 16 MiB are present and all on node 0 (the only, fast, node)
        assert t["fast_pages"] >= 16 * 2**20 // native.PAGE_SIZE and t["slow_pages"] == 0
        assert stats["loops"] >= 2
        human = d.ctl("stats")
        assert "MB/s" in human.stdout and "% of a core" in human.stdout
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'tiermemd_fast_tier_share{target="w"} 1.0' in body
        assert "tiermemd_loop_lag_seconds" in body and "tiermemd_cpu_seconds_total" in body
        assert d.ctl("pause").returncode == 0
        assert json.loads(d.ctl("status", "--json").stdout)["paused"] is True
        assert d.ctl("resume").returncode == 0
        r = d.ctl("policy", "w", "interleave")
        assert r.returncode == 0 and json.loads(
            d.ctl("status", "--json").stdout)["targets"][0]["policy"] == "interleave"
        r = d.ctl("policy", "w", "bogus")
        assert r.returncode != 0 and "unknown policy 'bogus'" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        # a broken config is refused on SIGHUP and on `ctl reload`; the old one keeps running
        good = open(cfg).read()
        with open(cfg, "a") as f:
            f.write('\n[migration]\nbandwidth = "fast"\n')
        d.p.send_signal(signal.SIGHUP)
        r = d.ctl("reload")
        assert r.returncode != 0 and "reload refused" in r.stderr
        assert "d.toml:migration.bandwidth: bad rate" in r.stderr
        time.sleep(0.5)
        assert d.p.poll() is None
        assert "reload refused, the running config stays" in d.text()
        # a file that is not UTF-8: refused in one line, the daemon keeps running
        open(cfg, "wb").write(good.encode().replace(b'name = "w"', b'name = "caf\xe9"'))
        d.p.send_signal(signal.SIGHUP)
        r = d.ctl("reload")
        assert r.returncode != 0 and "not UTF-8 text" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        time.sleep(0.5)
        assert d.p.poll() is None and "Traceback" not in d.text()
        # a good reload applies (new target name)
        open(cfg, "w").write(good.replace('name = "w"', 'name = "w2"'))
        r = d.ctl("reload")
        assert r.returncode == 0 and "w2" in r.stdout
        time.sleep(0.6)
        assert json.loads(d.ctl("status", "--json").stdout)["targets"][0]["pids"] == \
            [info["pid"]]
    finally:
        rc = d.stop()
    assert rc == 0, d.text()
    assert not (tmp_path / "ctl.sock").exists()
    assert not (tmp_path / "state" / "state.json").exists()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    wp.stdin.write("verify\n")
    wp.stdin.flush()
    assert wp.stdout.readline().strip() == "ok"


def test_non_root_cannot_control(tmp_path, worker):
    import tempfile
    sockdir = tempfile.mkdtemp(prefix="tiermemd-test-", dir="/run")
    os.chmod(sockdir, 0o755)                 # nobody can reach the socket file itself
    if not os.access("/run", os.X_OK, effective_ids=False) or os.stat("/run").st_mode & 0o001 == 0:
        os.rmdir(sockdir)
        pytest.skip("/run is not searchable by other users here: cannot reach the socket "
                    "as nobody")
    cfg, _ = config(tmp_path, TARGET, sockdir=sockdir)
    d = D(tmp_path, cfg, sockdir=sockdir)
    try:
        r = d.ctl("status", user="65534")
        assert r.returncode != 0
        assert r.stderr.strip() == ("tiermem: error: permission denied on "
                                    f"{sockdir}/ctl.sock: only root may control tiermemd")
        # even with the file mode loosened, the peer-credential check refuses the request
        os.chmod(d.sock, 0o666)
        r = d.ctl("pause", user="65534")
        assert r.returncode != 0 and "permission denied: uid 65534" in r.stderr, r.stderr
        assert json.loads(d.ctl("status", "--json").stdout)["paused"] is False
        assert "refused uid 65534" in d.text()
    finally:
        assert d.stop() == 0
        os.rmdir(sockdir)


def test_bad_config_at_start_leaves_nothing(tmp_path):
    cfg, _ = config(tmp_path, TARGET.replace("first-touch", "nonesuch"))
    r = subprocess.run([PY, "-m", "tiermemd", "-f", "-c", cfg], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "d.toml:targets[0].policy: unknown policy 'nonesuch'" in lines[0]
    assert not (tmp_path / "ctl.sock").exists() and not (tmp_path / "state").exists()
    # the same through the detaching (non --foreground) path
    r = subprocess.run([PY, "-m", "tiermemd", "-c", cfg], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_one_instance_and_kill9_recovery(tmp_path, worker):
    cfg, _ = config(tmp_path, TARGET)
    d = D(tmp_path, cfg)
    try:
        assert (tmp_path / "ctl.sock").exists()
        r = subprocess.run([PY, "-m", "tiermemd", "-f", "-c", cfg], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode != 0 and f"already running as PID {d.p.pid}" in r.stderr
    finally:
        d.stop(signal.SIGKILL)
    assert (tmp_path / "ctl.sock").exists()              # left behind by kill -9
    assert (tmp_path / "state" / "state.json").exists()
    d2 = D(tmp_path, cfg)
    try:
        assert d2.ctl("status").returncode == 0
        log = d2.text()
        assert f"previous tiermemd (PID {d.p.pid}) did not stop cleanly" in log
        assert f"removed stale control socket {tmp_path}/ctl.sock" in log
    finally:
        assert d2.stop() == 0


def daemon_prog_ids(pid):
    """Ids of the BPF programs a process holds (prog_id: lines of its fds' fdinfo)."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                ids.update(int(ln.split()[1]) for ln in f if ln.startswith("prog_id:"))
        except OSError:
            pass
    return ids


def test_kill9_with_ebpf_sampler_leaves_no_bpf_program(tmp_path, worker):
    """kill -9 of a daemon whose target is sampled by eBPF: the target keeps running with
    its memory intact, the daemon's BPF programs are gone with it (they are held by its file
    descriptors, nothing is pinned), and the next start serves the target again."""
    from tiermem.samplers.bpf import bcc_available
    ok, why = bcc_available()
    if not ok:
        pytest.skip(why)
    sys.path.insert(0, os.path.join(ROOT, "emulation", "workloads"))
    from sampler_hotcheck import prog_loaded
    wp, info = worker
    cfg, _ = config(tmp_path, TARGET.replace('"first-touch"', '"m5"\nsampler = "ebpf"'))
    d = D(tmp_path, cfg)
    ids = set()
    try:
        for _ in range(600):                 # bcc compiles the program: up to 60 s
            ids = daemon_prog_ids(d.p.pid)
            if ids or d.p.poll() is not None:
                break
            time.sleep(0.1)
        assert ids, "the daemon holds no BPF program: " + d.text()[-2000:]
        assert all(prog_loaded(i) for i in ids)
    finally:
        d.stop(signal.SIGKILL)
    assert wp.poll() is None                             # the target keeps running
    deadline = time.monotonic() + 10                     # freed once the last fd is closed
    while any(prog_loaded(i) for i in ids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(prog_loaded(i) for i in ids), "BPF programs left after kill -9"
    d2 = D(tmp_path, cfg)
    try:
        assert f"previous tiermemd (PID {d.p.pid}) did not stop cleanly" in d2.text()
        assert json.loads(d2.ctl("status", "--json").stdout)["targets"][0]["pids"] == \
            [info["pid"]]
    finally:
        assert d2.stop() == 0
    wp.stdin.write("verify\n")
    wp.stdin.flush()
    assert wp.stdout.readline().strip() == "ok"


def test_sampler_that_cannot_start_is_contained(tmp_path, worker):
    """DAMON here: either the kernel has no vaddr or another kdamond runs; either way the
    sampler fails to start, the daemon says so in one line and keeps serving the other
    target."""
    wp, info = worker
    targets = TARGET + f"""[[targets]]
name = "d"
pids = [{os.getpid()}]
sampler = "damon"
policy = "m5"
"""
    cfg, _ = config(tmp_path, targets.replace('cmdline = "pattern_worker.py 16"',
                                              f'pids = [{info["pid"]}]'))
    d = D(tmp_path, cfg)
    try:
        time.sleep(1.5)
        s = json.loads(d.ctl("status", "--json").stdout)
        by = {t["name"]: t for t in s["targets"]}
        if not by["d"]["sampler_error"]:
            pytest.skip("DAMON vaddr could start on this host: nothing to contain")
        assert by["d"]["sampler_error"].startswith("sampler damon failed to start: ")
        assert by["w"]["pids"] == [info["pid"]]
        st = json.loads(d.ctl("stats", "--json").stdout)
        assert st["targets"]["w"]["fast_pages"] > 0
        errs = [ln for ln in d.text().splitlines() if "sampler damon failed to start" in ln]
        assert len(errs) == 1, errs                    # once, not every loop
    finally:
        assert d.stop() == 0


# --- the mover, on this host's single node (moves to the node the page is on) -------------

def test_numa_mover_status_handling(worker):
    wp, info = worker
    m = make_mover("numa", 1e12, 1000)
    pages = np.arange(info["start"], info["end"], native.PAGE_SIZE, dtype=np.uint64)
    out = m.move(info["pid"], pages, 0)
    assert out.n_moved == pages.size and out.failed == {} and out.batches == 5
    # unmapped addresses: EFAULT, reported as gone, the rest moved
    bogus = np.arange(0x10000, 0x10000 + 8 * native.PAGE_SIZE, native.PAGE_SIZE,
                      dtype=np.uint64)
    out = m.move(info["pid"], np.concatenate([bogus, pages[:10]]), 0)
    assert out.failed == {"EFAULT": 8} and out.gone.size == 8 and out.n_moved == 10
    with pytest.raises(TargetGone):
        m.move(2**22 + 12345, pages[:4], 0)
    dry = make_mover("dry-run", 1e9, 100).move(info["pid"], pages, 0)
    assert dry.dry_run and dry.n_moved == 0 and dry.requested == pages.size
    assert set(MOVERS) == {"numa", "dry-run"}
    wp.stdin.write("verify\n")
    wp.stdin.flush()
    assert wp.stdout.readline().strip() == "ok"


@pytest.mark.parametrize("where", ["dir-itself", "below"])
def test_state_dir_on_read_only_fs_is_one_line(tmp_path, where):
    """daemon.state_dir on a read-only file system was a traceback at start: one line
    naming file:key, exit non-zero, nothing left (no socket, no state file), foreground and
    detached alike."""
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tiermemd-test-ro", str(ro)],
                   check=True)
    try:
        sd = ro if where == "dir-itself" else ro / "state"
        cfg, _ = config(tmp_path, TARGET)
        text = open(cfg).read().replace(f'state_dir = "{tmp_path}/state"',
                                        f'state_dir = "{sd}"')
        open(cfg, "w").write(text)
        for args in (["-f"], []):
            r = subprocess.run([PY, "-m", "tiermemd", *args, "-c", cfg], capture_output=True,
                               text=True, timeout=120)
            lines = [ln for ln in r.stderr.strip().splitlines()
                     if "no slow memory tier on this host" not in ln]    # a one-node host
            assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
            want = f"tiermemd: error: {cfg}:daemon.state_dir: cannot "
            assert len(lines) == 1 and lines[0].startswith(want), r.stderr
            assert "Read-only file system" in lines[0], r.stderr
            assert not (tmp_path / "ctl.sock").exists()
            assert os.listdir(ro) == []
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_ctl_stats_shows_a_workload_that_exits_mid_run(tmp_path):
    """Bad input: one of two tiered processes exits; tiermemd keeps serving the other and
    `tiermem ctl stats` (text, JSON and the metrics endpoint) counts the exit."""
    procs = [subprocess.Popen([PY, WORKER, "4"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        pids = [json.loads(p.stdout.readline())["pid"] for p in procs]
        cfg, port = config(tmp_path, f'[[targets]]\nname = "w"\npids = {pids}\n'
                                     'policy = "first-touch"\n')
        d = D(tmp_path, cfg)
        try:
            human = d.ctl("stats")
            assert human.returncode == 0, human.stderr
            assert "0 processes exited mid-run" in human.stdout, human.stdout
            procs[0].kill()
            procs[0].wait()
            for _ in range(100):
                t = json.loads(d.ctl("stats", "--json").stdout)["targets"]["w"]
                if t["processes_exited"]:
                    break
                time.sleep(0.1)
            assert t["processes_exited"] == 1 and t["processes"] == 1, t
            assert t["node_full_events"] == 0 and t["pages_refused"] == 0
            human = d.ctl("stats").stdout
            assert "1 processes exited mid-run, 0 moves stopped by a full node (ENOMEM), " \
                   "0 pages refused by the kernel" in human, human
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            assert 'tiermemd_processes_exited_total{target="w"} 1.0' in body
            assert d.p.poll() is None                        # still running
            assert json.loads(d.ctl("status", "--json").stdout)["targets"][0]["pids"] == \
                [pids[1]]
        finally:
            assert d.stop() == 0
    finally:
        for p in procs:
            p.kill()
            p.wait()
