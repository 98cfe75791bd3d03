"""The emulated CXL machine: boot a QEMU guest with a CPU-less slow memory node, run commands
in it, stop it.

    with Machine(MachineConfig(slow_nodes=1), workdir="/tmp/w") as m:
        r = m.run("numactl -H")        # or an argv list
        print(r.returncode, r.stdout)

The guest sees the host's root read-only and `workdir` writable at the same path; commands
run with the host's Python (the project's venv bin directory first on PATH). A Machine made
with detach=True outlives this process (the CLI's `start`); `Machine.attach(rundir)` finds it
again from its state file.
"""
from __future__ import annotations

import ctypes
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from emulation import guest_kernel, initramfs
from emulation.agent_client import AgentClient
from emulation.config import MachineConfig, check_guest_path
from tiermem.errors import TiermemError

QEMU = "qemu-system-x86_64"
AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest", "agent.py")
DEFAULT_RUNDIR = os.environ.get("TIERMEM_EMULATE_RUNDIR", "/run/tiermem/emulate")
STATE = "state.json"
QBOOT = "/usr/share/qemu/qboot.rom"   # minimal firmware: boots -kernel faster than SeaBIOS
BIOS = ["-bios", QBOOT] if os.path.exists(QBOOT) and not os.environ.get("TIERMEM_SEABIOS") else []
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# This checkout, shared read-only at its own path: the guest mounts tmpfs on /tmp, /run,
# /var/tmp and /dev/shm, which would hide a checkout (and its venv) living there.
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class GuestTimeout(TiermemError):
    """A command ran past its timeout in the guest and was killed."""

    def __init__(self, message: str, stdout: str = "", stderr: str = ""):
        super().__init__(message)
        self.stdout, self.stderr = stdout, stderr


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    duration_s: float


def prepare(log=print):
    """Guest kernel and initramfs, downloaded/built once and cached. Returns (kernel, initrd)."""
    if shutil.which(QEMU) is None:
        raise TiermemError(f"{QEMU} not found: apt-get install qemu-system-x86")
    k = guest_kernel.prepare_kernel(log=log)
    initrd = initramfs.build_initramfs(k, log=log)
    guest_kernel.uncompressed(k, log=log)
    return k, initrd


def _set_pdeathsig():
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent


def _lpj_args() -> list[str]:
    """lpj= for the guest (HZ=250): skips the secondary CPU's delay-loop calibration, which
    under TCG takes about a second and fails anyway."""
    try:
        with open("/proc/cpuinfo") as f:
            mhz = next(float(ln.split(":")[1]) for ln in f if ln.startswith("cpu MHz"))
    except (OSError, StopIteration, ValueError):
        return []
    return [f"lpj={int(mhz * 1e6 / 250)}"]


def _pid_is_qemu(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"qemu-system" in f.read().split(b"\0", 1)[0]
    except OSError:
        return False


def _tail(path: str, n: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
        return " | ".join(lines[-n:])
    except OSError:
        return ""


class Machine:
    def __init__(self, config: MachineConfig | None = None, workdir: str | None = None,
                 rundir: str | None = None, detach: bool = False):
        self.config = config or MachineConfig()
        self.config.validate()
        self.detach = detach
        self._own_rundir = rundir is None
        self.rundir = rundir or tempfile.mkdtemp(prefix="tiermem-vm-")
        self.workdir = os.path.abspath(workdir or os.path.join(self.rundir, "work"))
        check_guest_path(self.workdir, "work folder")
        check_guest_path(PROJECT, "project checkout")
        check_guest_path(AGENT, "guest agent path")
        self.python = sys.executable
        self.pid: int | None = None
        self.boot_s: float | None = None
        self.kernel_version: str | None = None
        self._proc: subprocess.Popen | None = None
        self._client: AgentClient | None = None

    # paths in the run directory
    @property
    def socket_path(self) -> str:
        return os.path.join(self.rundir, "agent.sock")

    @property
    def console_log(self) -> str:
        return os.path.join(self.rundir, "console.log")

    @property
    def state_path(self) -> str:
        return os.path.join(self.rundir, STATE)

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self.pid is not None and _pid_is_qemu(self.pid)

    def qemu_argv(self, vmlinuz: str, initrd: str) -> list[str]:
        c = self.config
        append = " ".join([
            "console=ttyS0", *((["printk.time=1", "loglevel=7"]) if os.environ.get("TIERMEM_GUEST_VERBOSE") else ["quiet", "loglevel=3"]), "panic=-1", "mitigations=off",
            "transparent_hugepage=madvise", "rdinit=/init", "i8042.noaux", "i8042.nokbd",
            "i8042.nopnp", "tsc=reliable", "no_timer_check", *_lpj_args(),
            f"tiermem.agent={AGENT}", f"tiermem.work={self.workdir}",
            f"tiermem.project={PROJECT}",
            f"tiermem.python={os.path.realpath('/usr/bin/python3')}"])
        return [QEMU, "-name", "tiermem-cxl", "-machine", "pc,hmat=on", *BIOS,
                "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(c.cpus),
                "-m", f"{c.total_mem_mib}M", *c.numa_args(),
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-serial", f"file:{self.console_log}", "-monitor", "none",
                "-kernel", vmlinuz, "-initrd", initrd, "-append", append,
                "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
                "-virtfs", f"local,path={PROJECT},mount_tag=project,security_model=none,"
                           "readonly=on,multidevs=remap",
                "-virtfs", f"local,path={self.workdir},mount_tag=work,security_model=none",
                "-device", "virtio-serial-pci",
                "-chardev", f"socket,id=agent,path={self.socket_path},server=on,wait=off",
                "-device", "virtserialport,chardev=agent,name=tiermem.agent"]

    def start(self, timeout: float = 180.0, log=None) -> "Machine":
        log = log or (lambda msg: None)
        k, initrd = prepare(log=log)
        self.kernel_version = k.version
        os.makedirs(self.rundir, exist_ok=True)
        os.makedirs(self.workdir, exist_ok=True)
        for p in (self.socket_path, self.console_log):
            if os.path.exists(p):
                os.unlink(p)
        kernel = k.vmlinuz
        if not os.environ.get("TIERMEM_BZIMAGE"):
            kernel = guest_kernel.uncompressed(k, log=log) or k.vmlinuz
        argv = self.qemu_argv(kernel, initrd)
        log(f"booting the emulated CXL machine ({self.config.cpus} vCPUs, node 0 "
            f"{self.config.fast_mem_mib} MiB, {self.config.slow_nodes} CPU-less node(s) of "
            f"{self.config.slow_mem_mib} MiB) under QEMU TCG")
        t0 = time.monotonic()
        with open(os.path.join(self.rundir, "qemu.log"), "w") as qlog:
            if self.detach:
                self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog,
                                              stderr=qlog, start_new_session=True)
            else:
                self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog,
                                              stderr=qlog, preexec_fn=_set_pdeathsig)
        self.pid = self._proc.pid
        try:
            self._client = AgentClient(self.socket_path, alive=self.alive)
            self._client.connect(timeout=30)
            self._client.wait_ready(timeout)
            self.boot_s = time.monotonic() - t0
        except BaseException as e:
            why = self._death_reason()
            self.stop()
            if isinstance(e, TiermemError) and why:
                raise TiermemError(f"the emulated CXL machine did not come up: {why}") from e
            raise
        self._write_state()
        log(f"guest ready in {self.boot_s:.1f} s (kernel {k.version})")
        return self

    def _death_reason(self) -> str:
        parts = []
        if self._proc is not None and self._proc.poll() is not None:
            parts.append(f"QEMU exited with status {self._proc.returncode}")
        q = _tail(os.path.join(self.rundir, "qemu.log"), 2)
        if q:
            parts.append(f"qemu: {q}")
        c = _tail(self.console_log, 3)
        if c:
            parts.append(f"console: {c}")
        return "; ".join(parts)

    def _write_state(self) -> None:
        state = {"mode": "qemu", "qemu_pid": self.pid, "socket": self.socket_path,
                 "console": self.console_log, "workdir": self.workdir, "rundir": self.rundir,
                 "python": self.python, "kernel": self.kernel_version,
                 "config": self.config.as_dict(), "boot_s": self.boot_s,
                 "started_at": time.time()}
        write_state(self.rundir, state)

    @classmethod
    def attach(cls, rundir: str = DEFAULT_RUNDIR) -> "Machine":
        """The running machine whose state is in rundir (started with detach=True)."""
        state = read_state(rundir)
        if state is None or state.get("mode") != "qemu":
            raise TiermemError(f"no emulated CXL machine is running (no state in {rundir}); "
                               f"start one with 'tiermem emulate start'")
        cfg = {k: v for k, v in state["config"].items()}
        m = cls(MachineConfig(**cfg), workdir=state["workdir"], rundir=rundir, detach=True)
        m.pid, m.boot_s, m.kernel_version = state["qemu_pid"], state["boot_s"], state["kernel"]
        m.python = state.get("python", sys.executable)
        if not m.alive():
            os.unlink(m.state_path)
            raise TiermemError(f"the emulated CXL machine (QEMU pid {m.pid}) is no longer "
                               f"running; start it again with 'tiermem emulate start'")
        m._client = AgentClient(m.socket_path, alive=m.alive)
        m._client.connect(timeout=5)
        return m

    def run(self, cmd, timeout: float = 600.0, check: bool = False, cwd: str | None = None,
            env: dict | None = None, input: str | None = None) -> RunResult:
        """Runs cmd (argv list, or a shell string) in the guest; returns its exit status and
        output. A command past timeout seconds is killed and GuestTimeout raised."""
        if self._client is None:
            raise TiermemError("the emulated CXL machine is not running")
        req: dict = {"op": "run", "timeout": timeout, "cwd": cwd or self.workdir,
                     "env": {"PATH": os.path.dirname(self.python) + ":" + GUEST_PATH,
                             # numpy's AVX2 (x86-64-v3) sort kernels return wrong orders
                             # under QEMU TCG (np.unique gave 101765 uniques of 100000
                             # values): keep numpy on its baseline kernels in the guest.
                             "NPY_DISABLE_CPU_FEATURES": "X86_V3",
                             **(env or {})},
                     "input": input}
        if isinstance(cmd, str):
            req["shell"] = cmd
            shown = cmd
        else:
            req["argv"] = [str(a) for a in cmd]
            shown = shlex.join(req["argv"])
        ans = self._client.request(req, timeout=timeout + 60)
        if not ans.get("ok"):
            raise TiermemError(ans.get("error", "the guest agent failed"))
        if ans["timed_out"]:
            raise GuestTimeout(f"command timed out after {timeout:g} s in the emulated CXL "
                               f"machine and was killed: {shown}", ans["stdout"], ans["stderr"])
        r = RunResult(ans["returncode"], ans["stdout"], ans["stderr"], ans["duration_s"])
        if check and r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            raise TiermemError(f"command failed in the guest (exit {r.returncode}): {shown}: "
                               f"{last}")
        return r

    def stop(self) -> None:
        """Powers the guest off (QEMU killed if it does not exit) and removes the state."""
        if self._client is not None:
            if self.alive():
                try:
                    self._client.request({"op": "poweroff"}, timeout=5)
                except TiermemError:
                    pass
            self._client.close()
            self._client = None
        deadline = time.monotonic() + 10
        while self.alive() and time.monotonic() < deadline:
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.1)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self.alive():
                break
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                break
            end = time.monotonic() + 5
            while self.alive() and time.monotonic() < end:
                time.sleep(0.05)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for p in (self.state_path, self.socket_path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        if self._own_rundir:
            shutil.rmtree(self.rundir, ignore_errors=True)

    def close_connection(self) -> None:
        """Disconnects from the agent, leaving the machine running (detached machines)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "Machine":
        if self._client is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def write_state(rundir: str, state: dict) -> None:
    os.makedirs(rundir, exist_ok=True)
    p = os.path.join(rundir, STATE)
    with open(p + ".tmp", "w") as f:
        json.dump(state, f, indent=1)
    os.replace(p + ".tmp", p)


def remove_state(rundir: str = DEFAULT_RUNDIR) -> None:
    try:
        os.unlink(os.path.join(rundir, STATE))
    except FileNotFoundError:
        pass


def read_state(rundir: str = DEFAULT_RUNDIR) -> dict | None:
    p = os.path.join(rundir, STATE)
    try:
        with open(p) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise TiermemError(f"corrupt state file {p}: {e}; remove it") from e
