"""Remote fork on two emulated hosts sharing one memory pool (emulation/hosts.py,
cxlfork/poolstore.py): a numpy worker checkpointed into the pool on host 0 answers correctly
as clones on host 1, which map the pool pages copy-on-write; corrupt or half-written images
are refused on host 1 with one line; an image a clone on host 1 maps is not removed by host
0; killing host 0's QEMU leaves host 1's clones running and the pool usable.

The steps inside the guests are tests/remote_guest.py (one JSON line each)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST = os.path.join(HERE, "remote_guest.py")
TIERMEM = [sys.executable, "-m", "tiermem.cli"]
MIB = 64


def _tiermem(*args, rundir="/nonexistent-tiermem-rundir"):
    env = dict(os.environ, TIERMEM_EMULATE_RUNDIR=rundir)
    return subprocess.run(TIERMEM + ["emulate", *args], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.mark.parametrize("args,msg", [
    (["start", "--hosts", "5"], "--hosts must be 1..4, got 5"),
    (["start", "--hosts", "2", "--pool-mib", "10"], "--pool-mib must be"),
    (["start", "--hosts", "2", "--node", "0"], "--hosts and --node exclude each other"),
    (["run", "--host", "1", "true"], "--host N needs several emulated hosts"),
])
def test_hosts_cli_errors(args, msg, tmp_path):
    r = _tiermem(*args, rundir=str(tmp_path))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not os.listdir(tmp_path)


def test_pool_cli_without_pool(tmp_path):
    env = dict(os.environ, CXLFORK_POOL=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "cxlfork", "pool", "ls"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"cxlfork: error: no memory pool at {tmp_path} (no valid host-id; boot hosts with "
        f"'tiermem emulate start --hosts 2', or set CXLFORK_POOL)"]


@pytest.mark.vm
def test_cli_cycle_start_status_run_stop(tmp_path, cxl_vm_available):
    """Before the module's fixture boots its hosts (at most two guests at a time)."""
    rundir, work = str(tmp_path / "run"), str(tmp_path / "work")
    p = subprocess.run(TIERMEM + ["emulate", "start", "--hosts", "2", "--pool-mib", "256",
                                  "--workdir", work], capture_output=True, text=True,
                       env=dict(os.environ, TIERMEM_EMULATE_RUNDIR=rundir), timeout=600)
    assert p.returncode == 0, p.stderr
    try:
        st = json.loads(_tiermem("status", "--json", rundir=rundir).stdout)
        assert st["mode"] == "hosts" and st["hosts"] == 2
        assert [m["running"] for m in st["machines"]] == [True, True]
        assert st["pool"]["path"] == "/run/cxlpool" and st["pool"]["region_mib"] == 128
        assert all(os.path.exists(r) for r in st["pool"]["regions"])
        for h in (0, 1):
            r = _tiermem("run", "--host", str(h), "cat /run/cxlpool/host-id", rundir=rundir)
            assert (r.returncode, r.stdout) == (0, f"{h}\n"), r.stderr
        r = _tiermem("run", "true", rundir=rundir)
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [
            "tiermem: error: 2 emulated hosts are running: say which with --host 0..1"]
        r = _tiermem("run", "--host", "2", "true", rundir=rundir)
        assert r.returncode == 1 and "--host must be 0..1" in r.stderr
        r = _tiermem("start", "--hosts", "2", rundir=rundir)
        assert r.returncode == 1 and "2 emulated hosts are already running" in r.stderr
    finally:
        p = _tiermem("stop", rundir=rundir)
    assert p.returncode == 0 and "2 emulated hosts stopped" in p.stdout, p.stderr
    assert not os.path.exists(os.path.join(rundir, "state.json"))
    assert not os.path.exists(st["pool"]["host_dir"])
    for m in st["machines"]:
        pid = m["qemu_pid"]
        assert not os.path.exists(f"/proc/{pid}/cmdline") or \
            open(f"/proc/{pid}/cmdline", "rb").read() == b""


@pytest.fixture
def cxl_vm_available():
    import shutil
    from emulation.machine import QEMU, prepare
    from tiermem.errors import TiermemError
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    try:
        prepare(log=lambda m: None)
    except TiermemError as e:
        pytest.skip(f"the emulated CXL machine's guest kernel is not available: {e}")


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    from emulation import hosts
    from emulation.config import MachineConfig
    from emulation.machine import QEMU, prepare
    from tiermem.errors import TiermemError
    import shutil
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    try:
        prepare(log=lambda m: None)
    except TiermemError as e:
        pytest.skip(f"the emulated CXL machine's guest kernel is not available: {e}")
    rundir = str(tmp_path_factory.mktemp("hosts-run"))
    work = str(tmp_path_factory.mktemp("hosts-work"))
    st = hosts.start(2, 512, MachineConfig(cpus=1, fast_mem_mib=1024, slow_mem_mib=256),
                     work, rundir=rundir, log=lambda m: None)
    ms = [hosts.attach(st, 0), hosts.attach(st, 1)]
    try:
        yield st, ms, work
    finally:
        for m in ms:
            m.close_connection()
        hosts.stop(hosts.current(rundir) or st, rundir)


def _step(m, *args, timeout=300):
    r = m.run([m.python, GUEST, *map(str, args)], timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _cxlfork(m, *args, timeout=120):
    return m.run([m.python, "-m", "cxlfork", *map(str, args)], timeout=timeout)


@pytest.mark.vm
def test_status_lists_hosts_and_pool(two_hosts):
    st, ms, _ = two_hosts
    r = _tiermem("status", "--json", rundir=st["rundir"])
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["mode"] == "hosts" and s["pool"]["path"] == "/run/cxlpool"
    assert [h["running"] for h in s["machines"]] == [True, True]
    for h, m in enumerate(ms):
        o = m.run("cat /run/cxlpool/host-id; grep cxlpool /proc/mounts", check=True).stdout
        lines = o.splitlines()
        assert lines[0] == str(h)
        mounts = {ln.split()[1]: ln.split()[3].split(",") for ln in lines[1:]}
        for r_ in (0, 1):
            opts = mounts[f"/run/cxlpool/h{r_}"]
            assert "dax=always" in opts and ("rw" if r_ == h else "ro") in opts


@pytest.mark.vm
def test_clone_on_other_host_answers_and_maps_pool(two_hosts):
    _, (a, b), _ = two_hosts
    c = _step(a, "ckpt", "w64", MIB)
    assert c["rc"] == 0 and c["original"] == "ok", c
    assert c["name"] == "h0/w64" and c["store"] == "/run/cxlpool/h0/h0.pages"
    r = _step(b, "clones", "w64", 3)
    assert r["rc"] == 0, r
    assert r["answers"] == ["done"] * 3 + ["ok"] * 3       # the checksum of 64 MiB, 3 times
    assert r["maps_pool"]                                   # mapped from host 0's slab
    # read-mostly clones keep their state on the pool: under 10% of it in B's own memory,
    # for all three together
    assert r["anon_kib"] < 0.10 * MIB * 1024, r
    v = _cxlfork(b, "pool", "verify", "w64")
    assert v.returncode == 0 and v.stdout.startswith("ok: h0/w64"), v.stderr
    # eager moa on B: the clone copies its state into B's memory, still answers right
    r = _step(b, "clones", "w64", 1, "moa-eager")
    assert r["rc"] == 0 and r["answers"] == ["done", "ok"], r
    assert r["anon_kib"] > 0.9 * MIB * 1024, r
    # lazy moa cannot work on DAX files (no userfaultfd minor faults there): one line
    r = _cxlfork(b, "pool", "restore", "w64", "--policy", "moa")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "cxlfork: error: lazy moa is not available on the pool: it needs userfaultfd minor "
        "faults, which the kernel has for shmem and hugetlbfs only, not for the pool's DAX "
        "files; use --policy moa --eager, or mow"], r.stderr


@pytest.mark.vm
def test_corrupt_or_half_written_image_refused_on_other_host(two_hosts):
    _, (a, b), _ = two_hosts
    for name in ("torn", "badman", "badpage"):
        assert _step(a, "ckpt", name, 4, "--kill")["rc"] == 0
    ls = json.loads(_cxlfork(a, "pool", "ls", "--json").stdout)
    rec = {i["name"]: i for i in ls["images"]}
    slot, man = rec["torn"]["slot"], rec["badman"]
    page = rec["badpage"]
    a.run([a.python, "-c", f"""
import os
fd = os.open('/run/cxlpool/h0/h0.log', os.O_RDWR)
os.pwrite(fd, b'\\0' * 16, {slot} * 4096 + 40)      # a record torn half-way
os.close(fd)
fd = os.open('/run/cxlpool/h0/h0.pages', os.O_RDWR)
os.pwrite(fd, b'Z', ({man['base']} + {man['npages']}) * 4096 + 30)   # manifest byte
os.pwrite(fd, b'Z', ({page['base']} + 5) * 4096 + 7)                # page byte
os.close(fd)
"""], check=True)
    want = {"torn": "pool image 'torn' is not published: its record is half-written or "
                    f"corrupt (h0.log slot {slot}: record checksum mismatch); refused",
            "badman": "pool image h0/badman: the manifest on the pool does not match its log "
                      "record (corrupt or half-written); refused"}
    for name, msg in want.items():
        r = _cxlfork(b, "pool", "restore", name)
        assert r.returncode == 1
        assert r.stderr.strip().splitlines() == [f"cxlfork: error: {msg}"], r.stderr
    r = _cxlfork(b, "pool", "verify", "badpage")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "page data content hash mismatch" in r.stderr and "refused" in r.stderr
    assert b.run(["pgrep", "-f", "cxlfork_progs/worker.py"]).returncode == 1   # no clone left
    ls = json.loads(_cxlfork(b, "pool", "ls", "--json").stdout)
    assert {"host": 0, "slot": slot, "why": "record checksum mismatch"} in ls["torn"]
    for name in ("badman", "badpage"):
        assert _cxlfork(a, "pool", "rm", name).returncode == 0


@pytest.mark.vm
def test_pool_key_provisioned_root_only_not_on_pool(two_hosts):
    st, ms, _ = two_hosts
    assert st["pool"]["key"] == "/run/cxlfork/pool.key"
    keys = []
    for m in ms:
        r = m.run([m.python, "-c", "import os, stat; p = '/run/cxlfork/pool.key'; "
                   "s = os.stat(p); d = os.stat(os.path.dirname(p)); "
                   "print(oct(stat.S_IMODE(s.st_mode)), s.st_uid, oct(stat.S_IMODE(d.st_mode)), "
                   "open(p, 'rb').read().hex())"], check=True)
        mode, uid, dmode, k = r.stdout.split()
        assert (mode, uid, dmode, len(k)) == ("0o600", "0", "0o700", 64), r.stdout
        keys.append(k)
    assert keys[0] == keys[1]                    # one key for the guests of one pool
    # never on the pool: not in any region's files
    for region in st["pool"]["regions"]:
        with open(region, "rb") as f:
            assert bytes.fromhex(keys[0]) not in f.read()


@pytest.mark.vm
@pytest.mark.parametrize("how,msg", [
    ("foreign", "pool image 'fk-foreign' refused: its log record (h0.log slot {slot}: record "
                "seal mismatch) is not sealed with this pool's key /run/cxlfork/pool.key "
                "(sealed under a foreign key, or edited)"),
    ("record", "pool image 'fk-record' refused: its log record (h0.log slot {slot}: record "
               "seal mismatch) is not sealed with this pool's key /run/cxlfork/pool.key "
               "(sealed under a foreign key, or edited)"),
    ("manifest", "pool image 'fk-manifest' refused: its log record (h0.log slot {slot}: "
                 "record seal mismatch) is not sealed with this pool's key "
                 "/run/cxlfork/pool.key (sealed under a foreign key, or edited)"),
    ("manifest-seal", "image h0/fk-manifest-seal on the pool: manifest checksum mismatch "
                      "(corrupt, edited, or not sealed with this pool's key "
                      "/run/cxlfork/pool.key)"),
])
def test_foreign_key_or_tampered_image_refused_on_other_host(two_hosts, how, msg):
    _, (a, b), _ = two_hosts
    name = f"fk-{how}"
    assert _step(a, "ckpt", name, 4, "--kill")["rc"] == 0
    slot = _step(a, "forge", name, how)["slot"]
    for args in (["restore", name], ["verify", name]):
        r = _cxlfork(b, "pool", *args)
        assert r.returncode == 1
        assert r.stderr.strip().splitlines() == [f"cxlfork: error: {msg.format(slot=slot)}"], \
            r.stderr
    assert b.run(["pgrep", "-f", "cxlfork_progs/worker.py"]).returncode == 1
    if how != "manifest-seal":                    # the owner no longer counts it as its own:
        ls = json.loads(_cxlfork(a, "pool", "ls", "--json").stdout)  # its extent is free
        assert {"host": 0, "slot": slot, "why": "record seal mismatch"} in ls["torn"]
        assert name not in [i["name"] for i in ls["images"]]
    else:
        assert _cxlfork(a, "pool", "rm", name).returncode == 0


@pytest.mark.vm
def test_both_hosts_checkpoint_at_once_and_clone_each_other(two_hosts):
    import threading
    _, (a, b), _ = two_hosts
    out = {}
    ts = [threading.Thread(target=lambda m=m, h=h: out.__setitem__(h, _step(m, "ckpt", "same",
                                                                            8, "--kill")))
          for h, m in enumerate((a, b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert out[0]["rc"] == 0 and out[1]["rc"] == 0, out
    assert (out[0]["name"], out[1]["name"]) == ("h0/same", "h1/same")
    # a bare name published by both hosts is ambiguous: one line
    r = _cxlfork(a, "pool", "restore", "same")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "cxlfork: error: pool image name 'same' is published by hosts h0, h1: say which, "
        "e.g. h0/same"], r.stderr
    for m, ref in ((a, "h1/same"), (b, "h0/same")):
        r = _step(m, "clones", ref, 1)
        assert r["rc"] == 0 and r["answers"] == ["done", "ok"], r
    # a host removes only its own images; then both are gone, nothing leased
    r = _cxlfork(a, "pool", "rm", "h1/same")
    assert r.returncode == 1 and "belongs to host 1: remove it there" in r.stderr
    assert _cxlfork(a, "pool", "rm", "h0/same").returncode == 0
    assert _cxlfork(b, "pool", "rm", "h1/same").returncode == 0
    ls = json.loads(_cxlfork(b, "pool", "ls", "--json").stdout)
    assert not [i for i in ls["images"] if i["name"] == "same"]


@pytest.mark.vm
def test_rm_interrupted_between_its_phases_is_put_back_by_gc(two_hosts):
    _, (a, b), _ = two_hosts
    assert _step(a, "ckpt", "half", 4, "--kill")["rc"] == 0
    # what a `pool rm` SIGKILLed after its first phase leaves: the record `freeing`
    a.run([a.python, "-c", "from cxlfork import poolstore as p; P = p.Pool(); "
           "r = P.find('half'); P.write_slot(r['slot'], dict(r, state='freeing'))"], check=True)
    r = _cxlfork(b, "pool", "restore", "half")
    assert r.returncode == 1 and "no image 'half' is published" in r.stderr, r.stderr
    r = _cxlfork(a, "pool", "gc")
    assert r.returncode == 0 and "1 record(s) put back: half" in r.stdout, r.stdout + r.stderr
    r = _step(b, "clones", "half", 1)
    assert r["rc"] == 0 and r["answers"] == ["done", "ok"], r
    assert _cxlfork(a, "pool", "rm", "half").returncode == 0


@pytest.mark.vm
def test_porter_on_host1_restores_what_host0s_porter_checkpointed(two_hosts):
    _, (a, b), _ = two_hosts
    # host 0: a cold instance serves 3 requests, is checkpointed into the pool (registry)
    ra = _step(a, "porter", 3, 4)
    assert ra["starts"] == ["cold"] + ["warm"] * 3 and ra["answers"] == [1, 2, 3, 4], ra
    assert ra["checkpoint"]["pool_image"] == "h0/porter.echo", ra
    assert not ra["looked_up"]
    # host 1: the function's first instance is a restore of host 0's checkpoint (its state
    # carries on from 3 requests), not a cold start
    rb = _step(b, "porter", 3, 2)
    assert rb["looked_up"], rb
    assert rb["starts"] == ["restored", "warm"] and rb["answers"] == [4, 5], rb
    assert rb["checkpoint"]["pool_image"] == "h0/porter.echo"
    assert rb["checkpoint"]["remote"] is True
    assert any("restoring from the pool image h0/porter.echo (another host took it)" in ln
               for ln in rb["log"]), rb["log"]
    # another function under that name (other init): not used, a cold start and its own
    # checkpoint into host 1's region
    rc = _step(b, "porter", 1, 2, 16)
    assert rc["starts"] == ["cold", "warm"] and rc["answers"] == [1, 2], rc
    assert rc["checkpoint"]["pool_image"] == "h1/porter.echo", rc
    assert any("is another function's checkpoint" in ln for ln in rc["log"]), rc["log"]
    # the porters left their images published, with no lease: their owners can remove them
    for m, ref in ((a, "h0/porter.echo"), (b, "h1/porter.echo")):
        r = _cxlfork(m, "pool", "rm", ref)
        assert r.returncode == 0, r.stderr


@pytest.mark.vm
def test_kill_host0_leaves_clones_on_host1_running(two_hosts):
    st, (a, b), work = two_hosts
    c = _step(a, "ckpt", "keep", 16, "--kill")
    assert c["rc"] == 0, c
    d = os.path.join(work, "hold")
    os.makedirs(d)
    b.run(f"setsid {b.python} {GUEST} hold keep 2 {d} > {d}/log 2>&1 < /dev/null &",
          check=True)
    t = time.monotonic()
    while not os.path.exists(os.path.join(d, "ready")):
        assert not os.path.exists(os.path.join(d, "result")), open(os.path.join(d, "result")).read()
        assert time.monotonic() - t < 300, open(os.path.join(d, "log")).read()
        time.sleep(0.5)
    assert open(os.path.join(d, "ready")).read().split() == ["pong", "pong"]
    # host 0 may not free an image host 1's clones map
    r = _cxlfork(a, "pool", "rm", "keep")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "cxlfork: error: pool image h0/keep is mapped by clones on host(s) 1; not removed (a "
        "host that is gone: --ignore-host N)"], r.stderr
    # host 0 dies
    pid0 = st["machines"][0]["qemu_pid"]
    os.kill(pid0, signal.SIGKILL)
    a.close_connection()
    t = time.monotonic()
    while os.path.exists(f"/proc/{pid0}") and "qemu" in open(f"/proc/{pid0}/cmdline").read() \
            and open(f"/proc/{pid0}/stat").read().split()[2] != "Z":
        assert time.monotonic() - t < 30
        time.sleep(0.1)
    open(os.path.join(d, "go"), "w").close()
    t = time.monotonic()
    while not os.path.exists(os.path.join(d, "result")):
        assert time.monotonic() - t < 300, open(os.path.join(d, "log")).read()
        time.sleep(0.5)
    res = json.load(open(os.path.join(d, "result")))
    assert res["rc"] == 0 and res["answers"] == ["pong", "pong", "done", "ok", "done", "ok"]
    # the pool is consistent for what comes next: host 0's image still restores on host 1,
    # and host 1 checkpoints into its own region and restores from it
    r = _step(b, "clones", "keep", 1)
    assert r["rc"] == 0 and r["answers"] == ["done", "ok"], r
    assert _step(b, "ckpt", "after", 8)["rc"] == 0
    r = _step(b, "clones", "h1/after", 2)
    assert r["rc"] == 0 and r["answers"] == ["done"] * 2 + ["ok"] * 2, r
