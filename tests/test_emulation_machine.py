"""The emulated CXL machine, checked from inside the guest: NUMA shape, memory tiers, commands,
exit codes, timeouts, the writable work folder."""
import os
import uuid

import pytest

from emulation.machine import GuestTimeout

pytestmark = pytest.mark.vm


def _read(vm, path):
    r = vm.run(["cat", path], timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_two_nodes_node1_cpuless_with_memory(cxl_vm):
    assert _read(cxl_vm, "/sys/devices/system/node/online") == "0-1"
    assert _read(cxl_vm, "/sys/devices/system/node/has_cpu") == "0"
    assert _read(cxl_vm, "/sys/devices/system/node/has_memory") == "0-1"
    assert _read(cxl_vm, "/sys/devices/system/node/node0/cpulist") == "0-1"
    assert _read(cxl_vm, "/sys/devices/system/node/node1/cpulist") == ""
    meminfo = _read(cxl_vm, "/sys/devices/system/node/node1/meminfo")
    total_kb = int(next(ln.split()[3] for ln in meminfo.splitlines() if "MemTotal" in ln))
    assert total_kb > 1536 * 1024          # about 2 GiB configured
    dist = _read(cxl_vm, "/sys/devices/system/node/node0/distance").split()
    assert dist[0] == "10" and int(dist[1]) > 10


def test_slow_node_in_lower_memory_tier(cxl_vm):
    base = "/sys/devices/virtual/memory_tiering"
    r = cxl_vm.run(f"for t in {base}/memory_tier*; do echo ${{t##*memory_tier}} "
                   f"$(cat $t/nodelist); done", timeout=60)
    assert r.returncode == 0, r.stderr
    tiers = {}
    for line in r.stdout.splitlines():
        tier, nodes = line.split()
        tiers[nodes] = int(tier)
    assert set(tiers) == {"0", "1"}, r.stdout        # two tiers, one node each
    assert tiers["1"] > tiers["0"]                    # higher id = slower tier


def test_hmat_latency_reaches_guest(cxl_vm):
    # the kernel exports the HMAT access class of each memory node
    p = "/sys/devices/system/node/node{}/access0/initiators/read_latency"
    fast, slow = int(_read(cxl_vm, p.format(0))), int(_read(cxl_vm, p.format(1)))
    assert (fast, slow) == (cxl_vm.config.fast_latency_ns, cxl_vm.config.slow_latency_ns)


def test_output_and_exit_code(cxl_vm):
    r = cxl_vm.run("echo out; echo err >&2; exit 0", timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "out\n", "err\n")
    r = cxl_vm.run(["sh", "-c", "exit 7"], timeout=60)
    assert r.returncode == 7


def test_failing_command_and_check(cxl_vm):
    r = cxl_vm.run(["ls", "/no/such/path"], timeout=60)
    assert r.returncode != 0 and "No such file" in r.stderr
    from tiermem.errors import TiermemError
    with pytest.raises(TiermemError, match="exit"):
        cxl_vm.run(["false"], timeout=60, check=True)
    with pytest.raises(TiermemError, match="cannot run"):
        cxl_vm.run(["/no/such/binary"], timeout=60)


def test_timeout_gives_clear_error(cxl_vm):
    with pytest.raises(GuestTimeout, match=r"timed out after 2 s .*sleep 100"):
        cxl_vm.run("echo started; sleep 100", timeout=2)
    # the machine still answers afterwards
    assert cxl_vm.run("echo alive", timeout=60).stdout == "alive\n"


def test_work_folder_is_writable_both_ways(cxl_vm):
    name = f"probe-{uuid.uuid4().hex}"
    host_path = os.path.join(cxl_vm.workdir, name)
    r = cxl_vm.run(f"echo from-guest > {host_path}", timeout=60)
    assert r.returncode == 0, r.stderr
    with open(host_path) as f:
        assert f.read() == "from-guest\n"
    with open(host_path, "a") as f:
        f.write("from-host\n")
    assert _read(cxl_vm, host_path) == "from-guest\nfrom-host"


def test_host_root_read_only_and_project_importable(cxl_vm):
    r = cxl_vm.run("touch /usr/tiermem-should-fail", timeout=60)
    assert r.returncode != 0
    r = cxl_vm.run([cxl_vm.python, "-c", "import tiermem, numpy; print('ok')"], timeout=120)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr


def test_guest_filesystems_mounted(cxl_vm):
    mounts = _read(cxl_vm, "/proc/mounts")
    for fs in ("tracefs", "debugfs", "bpf", "cgroup2", "devpts"):
        assert f" {fs} " in mounts, fs
    r = cxl_vm.run("modprobe -n -v vsock && echo found", timeout=60)
    assert r.returncode == 0 and "found" in r.stdout, r.stderr


def test_stdin_input(cxl_vm):
    r = cxl_vm.run(["wc", "-c"], input="12345", timeout=60)
    assert r.stdout.strip() == "5"
