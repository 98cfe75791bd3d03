"""The porter's memory cgroup, for real: instances (cold, and restored into ghosts) live in the
function's cgroup under the porter's limit; an instance that goes over it is OOM-killed by the
kernel, the client gets a 502 naming the OOM killer, and the instance is replaced; the cgroup
is gone after shutdown; a SIGKILLed porter's cgroup is removed by the next porter; without a
writable cgroup the porter refuses to start with one line."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from test_porter_service import ECHO, PY, Porter, _alive, _gone, porter  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cxlfork ptrace)")

LIMITED = "local_memory_limit_mib = 96\nghost_pool = 2"


def _procs(path: str) -> set[int]:
    with open(os.path.join(path, "cgroup.procs")) as f:
        return {int(x) for x in f.read().split()}


def _limit(cg: dict) -> int:
    name = "memory.max" if cg["version"] == 2 else "memory.limit_in_bytes"
    with open(os.path.join(cg["path"], name)) as f:
        return int(f.read())


@pytest.mark.parametrize("policy", ["mow", "moa-eager"])
def test_instances_in_the_cgroup_oom_kill_gives_502_and_a_replacement(porter, policy):
    """Warm ghosts for every policy under a limit: they are born in the function's cgroup
    (moa-eager ghosts copy every private page when spawned, charged there)."""
    p = porter(ECHO.format(policy=policy, slo=1000), LIMITED)
    for i in range(3):                                  # cold, then the checkpoint (K = 3)
        assert p.invoke("echo", i)[0] == 200
    st = p.wait_for(lambda s: s["functions"]["echo"]["checkpoint"]["image"]
                    and s["porter"]["cgroup"], 30, "the checkpoint and a cgroup sample")
    cg = st["porter"]["cgroup"]
    fn_cg = os.path.join(cg["path"], "fn-echo")
    assert _limit(cg) == 96 << 20
    cold = st["functions"]["echo"]["instance_list"][0]["pid"]
    assert cold in _procs(fn_cg)
    # the ghosts wait in the function's cgroup; a restored clone is one of them
    st = p.wait_for(lambda s: s["functions"]["echo"]["ghosts"]["idle"] == 2 and
                    set(s["functions"]["echo"]["ghosts"]["idle_pids"]) <= _procs(fn_cg), 20,
                    "2 ghosts in the cgroup")
    ghosts = set(st["functions"]["echo"]["ghosts"]["idle_pids"])
    assert st["functions"]["echo"]["ghosts"]["warm"]        # any policy: born in the cgroup
    assert len(ghosts) == 2 and ghosts <= _procs(fn_cg)
    import threading
    res = []
    t = threading.Thread(target=lambda: res.append(p.invoke("echo", {"sleep": 1.0})))
    t.start()
    time.sleep(0.3)
    code, out, r = p.invoke("echo", "x")
    t.join()
    assert code == 200 and r.getheader("X-Porter-Start") == "restored", (code, out)
    clone = int(r.getheader("X-Porter-Instance"))
    assert clone in ghosts and clone in _procs(fn_cg)
    assert p.stats()["functions"]["echo"]["ghosts"]["taken"] >= 1
    metrics = p.request("GET", "/metrics")[1]
    assert 'porter_ghosts{function="echo",state="idle"}' in metrics
    assert 'porter_cgroup_memory_bytes{function="echo",kind="working_set"}' in metrics
    # 200 MiB more in one instance cannot fit under 96 MiB: the kernel kills it
    code, out, r = p.invoke("echo", {"alloc_mib": 200})
    assert code == 502 and "OOM killer" in out["error"] and "96 MiB" in out["error"], out
    victim = int(r.getheader("X-Porter-Instance") or 0) or None
    st = p.wait_for(lambda s: s["functions"]["echo"]["errors"].get("oom_kill", 0) >= 1
                    and s["porter"]["cgroup"]["oom_kills"] >= 1, 20, "the OOM kill counted")
    if victim:
        assert _gone(victim)
    # the replacement (or the other instance) serves on
    p.wait_for(lambda s: s["functions"]["echo"]["instances"] >= 1, 30, "a replacement")
    code, out, _ = p.invoke("echo", "after")
    assert code == 200, out
    pids = set(p.seen) | _procs(fn_cg)
    rc, err = p.stop()
    assert rc == 0, err
    assert not os.path.exists(cg["path"]), "the porter's cgroup outlived it"
    assert not any(_alive(x) for x in pids)


def test_cgroup_of_a_sigkilled_porter_is_removed_at_the_next_start(porter):
    a = porter(ECHO.format(policy="cold", slo=1000), LIMITED)
    assert a.invoke("echo", 1)[0] == 200
    cg = a.wait_for(lambda s: s["porter"]["cgroup"], 10, "a cgroup sample")["porter"]["cgroup"]
    assert os.path.isdir(cg["path"])
    a.p.send_signal(signal.SIGKILL)
    a.p.wait()
    assert os.path.isdir(cg["path"])                     # nobody removed it
    b = porter(ECHO.format(policy="cold", slo=1000), LIMITED)
    assert not os.path.exists(cg["path"])
    cg_b = b.wait_for(lambda s: s["porter"]["cgroup"], 10, "a cgroup sample")["porter"]["cgroup"]
    rc, err = b.stop()
    assert rc == 0 and "removing the memory cgroup of a porter that is gone" in err, err
    assert not os.path.exists(cg_b["path"])


def test_no_writable_cgroup_is_one_line_and_exit_1():
    """As uid 65534 no memory cgroup is writable: the porter says so and starts nothing."""
    from conftest import run_unprivileged
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = tempfile.mkdtemp(prefix="porter-nocg-", dir="/dev/shm")
    try:
        os.chmod(d, 0o755)
        cfg = os.path.join(d, "p.toml")
        with open(cfg, "w") as f:
            f.write('[porter]\nport = 0\nlocal_memory_limit_mib = 64\n'
                    '[functions.e]\ncommand = ["true"]\n')
        os.chmod(cfg, 0o644)
        r = run_unprivileged([PY, "-m", "cxlfork", "porter", "--config", cfg], cwd=here,
                             capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert r.returncode == 1 and not r.stdout, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a writable memory cgroup" in lines[0], r.stderr
