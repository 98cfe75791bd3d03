"""Several emulated hosts sharing one memory pool (`tiermem emulate start --hosts N`).

Each host is an ordinary emulated CXL machine (emulation.machine.Machine: its own DRAM node
with the CPUs and its own CPU-less node) plus the **pool**: one region per host, each a file
in the host's /dev/shm that every QEMU maps with `memory-backend-file,share=on` and shows
to its guest as a virtio-pmem device. The regions are formatted here, on the host, before any
guest boots: ext4 without a journal, holding three files whose blocks are all allocated and
written (`hH.pages` the page slab, `hH.log` the published-image log, `hH.leases` the clone
leases of host H). In guest G, region H is mounted at /run/cxlpool/hH with `-o dax`:
read-write when H == G (its owner), read-only everywhere else. File data goes straight to
and from the shared memory (DAX: no page cache), and because no file is ever created,
extended or removed after formatting, the read-only mounts never see filesystem metadata
change under them (the only metadata the owner writes is mtime). Which bytes of the slabs
are published images is the business of cxlfork.poolstore, through its own log.

The pool's key (cxlfork.trust.pool_key: pool images and log records are sealed with it) is
made here, 32 random bytes per `start`, and written into every guest over its agent channel
(stdin of one command, never a command line) as /run/cxlfork/pool.key: 0600, root, in a
0700 directory on the guest's tmpfs /run. It is never written to the pool, nor kept on the
host: hosts that were not booted together do not trust each other's images.

Why not cxl-type3: QEMU 7.2 here has it, but a CXL region over it needs the `cxl` tool in
the guest to program decoders, and a dax region would be a devdax device, which refuses
MAP_PRIVATE: clones could not map it copy-on-write. Why one file per region and not one
file: QEMU 7.2's memory-backend-file has no offset=, and one ext4 shared read-write by two
kernels would corrupt (their caches are not coherent).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time

from emulation.config import MachineConfig
from emulation.machine import DEFAULT_RUNDIR, GuestTimeout, Machine, read_state, remove_state, write_state
from tiermem.errors import TiermemError

POOL_GUEST = "/run/cxlpool"            # where the regions are mounted in every guest
def pool_dir(rundir: str) -> str:
    """The host folder of the pool's region files: memory (/dev/shm), one per run directory
    ($TIERMEM_POOL_DIR overrides)."""
    return os.environ.get("TIERMEM_POOL_DIR") or \
        "/dev/shm/tiermem-pool" + os.path.abspath(rundir).replace("/", "-")
LOG_MIB = 2
LEASES_MIB = 1
FS_OVERHEAD_MIB = 12                   # ext4 metadata of a region (no journal, 64 inodes)
FILL = b"\xa5"                         # mke2fs -d leaves all-zero blocks as holes: avoid


class PoolMachine(Machine):
    """A Machine that also maps every pool region (virtio-pmem over a shared file)."""

    def __init__(self, *a, regions: list[str], **kw):
        super().__init__(*a, **kw)
        self.regions = regions

    def qemu_argv(self, vmlinuz: str, initrd: str) -> list[str]:
        argv = super().qemu_argv(vmlinuz, initrd)
        i = argv.index("-m")
        total = self.config.total_mem_mib
        pool = sum(os.path.getsize(r) for r in self.regions) >> 20
        argv[i + 1] = f"{total}M,slots={len(self.regions) + 1},maxmem={total + pool + 1024}M"
        for n, path in enumerate(self.regions):
            argv += ["-object", f"memory-backend-file,id=pool{n},share=on,mem-path={path},"
                                f"size={os.path.getsize(path) >> 20}M",
                     "-device", f"virtio-pmem-pci,memdev=pool{n},id=pmem{n}"]
        return argv


def region_mib(pool_mib: int, hosts: int) -> int:
    return (pool_mib // hosts) & ~1          # 2 MiB multiples (virtio-pmem alignment)


def check(hosts: int, pool_mib: int) -> None:
    if not 2 <= hosts <= 4:
        raise TiermemError(f"--hosts must be 1..4, got {hosts}")
    need = hosts * (FS_OVERHEAD_MIB + LOG_MIB + LEASES_MIB + 64)
    if pool_mib < need or pool_mib > 16384:
        raise TiermemError(f"--pool-mib must be {need}..16384 for {hosts} hosts "
                           f"(each region needs 64 MiB of pages), got {pool_mib}")


def _fill(path: str, mib: int) -> None:
    block = FILL * (1 << 20)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(block)


def format_pool(pool_dir: str, hosts: int, pool_mib: int) -> list[str]:
    """One ext4 region file per host, its three files fully allocated. Returns the paths."""
    if shutil.which("mke2fs") is None:
        raise TiermemError("mke2fs not found: apt-get install e2fsprogs")
    shutil.rmtree(pool_dir, ignore_errors=True)
    os.makedirs(pool_dir, mode=0o700)
    rmib = region_mib(pool_mib, hosts)
    paths = []
    for h in range(hosts):
        stage = tempfile.mkdtemp(prefix=f"tiermem-pool-h{h}-", dir="/var/tmp")
        try:
            _fill(os.path.join(stage, f"h{h}.pages"), rmib - FS_OVERHEAD_MIB - LOG_MIB - LEASES_MIB)
            _fill(os.path.join(stage, f"h{h}.log"), LOG_MIB)
            _fill(os.path.join(stage, f"h{h}.leases"), LEASES_MIB)
            for n in os.listdir(stage):
                os.chmod(os.path.join(stage, n), 0o600)
            os.chmod(stage, 0o755)
            img = os.path.join(pool_dir, f"region{h}.img")
            r = subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0",
                                "-N", "64", "-L", f"cxlpool-h{h}", "-O", "^has_journal",
                                "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", stage,
                                img, f"{rmib}M"], capture_output=True, text=True)
            if r.returncode != 0:
                raise TiermemError(f"formatting pool region {h} failed: "
                                   f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
            paths.append(img)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return paths


def mount_script(host: int, hosts: int) -> str:
    """Shell run in guest `host` after boot: load the drivers, mount every region."""
    lines = ["set -ex", "modprobe -a virtio_pmem nd_pmem ext4",
             f"mkdir -p {POOL_GUEST}",
             "for i in $(seq 100); do [ $(ls /dev/pmem* 2>/dev/null | wc -l) -ge "
             f"{hosts} ] && break; sleep 0.1; done"]
    for h in range(hosts):
        mode = "rw" if h == host else "ro"
        lines += [f"d=$(blkid -L cxlpool-h{h})", f"mkdir -p {POOL_GUEST}/h{h}",
                  f"mount -t ext4 -o {mode},dax=always,noatime $d {POOL_GUEST}/h{h}"]
    lines += [f"echo {host} > {POOL_GUEST}/host-id"]
    return "\n".join(lines)


POOL_KEY_GUEST = "/run/cxlfork/pool.key"      # cxlfork.trust.POOL_KEY
PROVISION = f"""
import os, sys
key = bytes.fromhex(sys.stdin.read().strip())
assert len(key) == 32
d = os.path.dirname({POOL_KEY_GUEST!r})
os.makedirs(d, mode=0o700, exist_ok=True)
os.chmod(d, 0o700)
tmp = {POOL_KEY_GUEST!r} + ".tmp"
fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
os.write(fd, key)
os.fsync(fd)
os.close(fd)
os.rename(tmp, {POOL_KEY_GUEST!r})
"""


def provision_key(m: Machine, key: bytes) -> None:
    """Write the pool key into guest m (see the module docstring)."""
    r = m.run([m.python, "-S", "-c", PROVISION], input=key.hex(), timeout=120)
    if r.returncode != 0:
        raise TiermemError("provisioning the pool key failed: "
                           f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")


def host_rundir(rundir: str, h: int) -> str:
    return os.path.join(rundir, f"host{h}")


def start(hosts: int, pool_mib: int, config: MachineConfig, workdir: str,
          rundir: str = DEFAULT_RUNDIR, timeout: float = 240.0, log=print) -> dict:
    """Format the pool, boot every host (in parallel), mount the regions; writes the state."""
    check(hosts, pool_mib)
    config.validate()
    pdir = pool_dir(rundir)
    regions = format_pool(pdir, hosts, pool_mib)
    log(f"pool: {hosts} regions of {region_mib(pool_mib, hosts)} MiB in {pdir}")
    machines = [PoolMachine(config, workdir=workdir, rundir=host_rundir(rundir, h),
                            detach=True, regions=regions) for h in range(hosts)]
    errors: list[BaseException | None] = [None] * hosts
    key = secrets.token_bytes(32)

    def boot(h: int) -> None:
        try:
            machines[h].start(timeout=timeout, log=lambda m: log(f"host {h}: {m}"))
            try:
                r = machines[h].run(mount_script(h, hosts), timeout=120)
            except GuestTimeout as e:
                raise TiermemError(f"host {h}: mounting the pool timed out; last step: "
                                   f"{(e.stderr.strip().splitlines() or ['?'])[-1]}") from e
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["?"])[-1]
                raise TiermemError(f"host {h}: mounting the pool failed: {last}")
            provision_key(machines[h], key)
        except BaseException as e:          # noqa: BLE001 - reported below
            errors[h] = e

    threads = [threading.Thread(target=boot, args=(h,)) for h in range(hosts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(errors):
        for m in machines:
            m.stop()
        shutil.rmtree(pdir, ignore_errors=True)
        e = next(x for x in errors if x)
        raise e if isinstance(e, TiermemError) else TiermemError(str(e))
    state = {"mode": "hosts", "hosts": hosts, "rundir": rundir, "workdir": workdir,
             "config": config.as_dict(),
             "pool": {"path": POOL_GUEST, "host_dir": pdir, "pool_mib": pool_mib,
                      "region_mib": region_mib(pool_mib, hosts), "regions": regions,
                      "device": "virtio-pmem", "fs": "ext4 -o dax (owner rw, others ro)",
                      "key": POOL_KEY_GUEST},
             "machines": [{"host": h, "rundir": m.rundir, "qemu_pid": m.pid,
                           "boot_s": m.boot_s, "console": m.console_log}
                          for h, m in enumerate(machines)],
             "started_at": time.time()}
    for m in machines:
        m.close_connection()
    write_state(rundir, state)
    return state


def attach(state: dict, host: int) -> Machine:
    n = state["hosts"]
    if not 0 <= host < n:
        raise TiermemError(f"--host must be 0..{n - 1} ({n} hosts are running), got {host}")
    return Machine.attach(state["machines"][host]["rundir"])


def status(state: dict) -> dict:
    from emulation.machine import _pid_is_qemu
    out = dict(state)
    out["machines"] = [dict(m, running=_pid_is_qemu(m["qemu_pid"] or 0))
                       for m in state["machines"]]
    out["running"] = any(m["running"] for m in out["machines"])
    out["uptime_s"] = round(time.time() - state["started_at"], 1)
    return out


def stop(state: dict, rundir: str = DEFAULT_RUNDIR) -> list[int]:
    """Stops every host still running (a dead one is skipped), removes the pool."""
    stopped = []
    for rec in state["machines"]:
        try:
            m = Machine.attach(rec["rundir"])
        except TiermemError:
            continue
        m.stop()
        stopped.append(rec["qemu_pid"])
    shutil.rmtree(state.get("pool", {}).get("host_dir") or pool_dir(rundir), ignore_errors=True)
    remove_state(rundir)
    return stopped


def state_json(state: dict) -> str:
    return json.dumps(status(state), indent=1)


def current(rundir: str = DEFAULT_RUNDIR) -> dict | None:
    s = read_state(rundir)
    return s if s is not None and s.get("mode") == "hosts" else None
