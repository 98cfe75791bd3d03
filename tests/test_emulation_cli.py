"""`tiermem emulate`: errors without a machine, argument validation, and (vm) a full
start/run/status/stop cycle of a detached machine."""
import json
import os
import subprocess
import sys

import pytest

from emulation.config import MachineConfig
from tiermem.errors import TiermemError

TIERMEM = [sys.executable, "-m", "tiermem.cli"]


def _cli(args, rundir, timeout=300):
    env = dict(os.environ, TIERMEM_EMULATE_RUNDIR=str(rundir))
    return subprocess.run(TIERMEM + ["emulate", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _one_error_line(p):
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tiermem: error: "), p.stderr
    return lines[0]


def test_run_without_machine_is_one_clear_error(tmp_path):
    p = _cli(["run", "echo", "hi"], tmp_path)
    assert "no emulated CXL machine is running" in _one_error_line(p)
    assert p.stdout == ""


def test_stop_without_machine(tmp_path):
    _one_error_line(_cli(["stop"], tmp_path))


def test_status_json_without_machine(tmp_path):
    p = _cli(["status", "--json"], tmp_path)
    assert p.returncode == 0
    assert json.loads(p.stdout) == {"mode": None, "running": False}


def test_node_that_does_not_exist(tmp_path):
    p = _cli(["start", "--node", "77"], tmp_path)
    assert "NUMA node 77 does not exist" in _one_error_line(p)
    assert not os.path.exists(tmp_path / "state.json")


def test_offline_cpus_needs_node(tmp_path):
    assert "--offline-cpus needs --node" in _one_error_line(_cli(["start", "--offline-cpus"],
                                                                 tmp_path))


def test_bad_latencies_rejected_before_boot(tmp_path):
    p = _cli(["start", "--fast-latency", "300", "--slow-latency", "200"], tmp_path)
    assert "latencies must satisfy" in _one_error_line(p)
    assert not os.path.exists(tmp_path / "state.json")


def test_corrupt_state_file(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    assert "corrupt state file" in _one_error_line(_cli(["run", "true"], tmp_path))


def test_stale_state_of_dead_machine(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({
        "mode": "qemu", "qemu_pid": 2**22 - 1, "socket": str(tmp_path / "agent.sock"),
        "workdir": str(tmp_path), "rundir": str(tmp_path), "kernel": "x", "boot_s": 1.0,
        "config": MachineConfig().as_dict(), "console": "", "started_at": 0}))
    assert "no longer running" in _one_error_line(_cli(["run", "true"], tmp_path))
    assert not os.path.exists(tmp_path / "state.json")


def test_config_numa_arguments():
    cfg = MachineConfig(slow_nodes=2, fast_latency_ns=100, slow_latency_ns=250)
    cfg.validate()
    a = " ".join(cfg.numa_args())
    assert "node,nodeid=1,memdev=m1,initiator=0" in a
    assert "node,nodeid=2,memdev=m2,initiator=0" in a
    assert "dist,src=0,dst=1,val=25" in a and "dist,src=1,dst=2,val=35" in a
    assert "target=1,hierarchy=memory,data-type=access-latency,latency=250" in a
    assert "target=0,hierarchy=memory,data-type=access-bandwidth,bandwidth=40000M" in a
    assert cfg.total_mem_mib == 2048 * 3
    with pytest.raises(TiermemError, match="slow nodes must be 1..8"):
        MachineConfig(slow_nodes=0).validate()
    with pytest.raises(TiermemError, match="bandwidths"):
        MachineConfig(slow_bandwidth_gbs=80).validate()


@pytest.mark.vm
def test_detached_machine_cycle(tmp_path, cxl_vm):
    # cxl_vm is requested so this runs only where the guest can boot; it boots its own,
    # small, detached machine through the CLI
    rundir, work = tmp_path / "run", tmp_path / "work"
    p = _cli(["start", "--fast-mem", "512", "--slow-mem", "384", "--slow-latency", "250",
              "--workdir", str(work)], rundir)
    assert p.returncode == 0, p.stderr
    try:
        st = json.loads(_cli(["status", "--json"], rundir).stdout)
        assert st["running"] and st["config"]["slow_latency_ns"] == 250
        p = _cli(["run", f"cat /sys/devices/system/node/has_cpu; echo x > {work}/f; exit 5"],
                 rundir)
        assert (p.returncode, p.stdout) == (5, "0\n")
        assert (work / "f").read_text() == "x\n"
        p = _cli(["run", "--json", "--", "ls", "-d", "/sys/devices/system/node/node1"], rundir)
        assert json.loads(p.stdout)["stdout"] == "/sys/devices/system/node/node1\n"
        assert "already running" in _one_error_line(_cli(["start"], rundir))
    finally:
        p = _cli(["stop"], rundir)
    assert p.returncode == 0, p.stderr
    assert not os.path.exists(rundir / "state.json")
    assert not os.path.exists(f"/proc/{st['qemu_pid']}/cmdline") or \
        open(f"/proc/{st['qemu_pid']}/cmdline", "rb").read() == b""
