"""Freeze a process with ptrace and ask it questions: registers, xstate, rseq, and small
syscalls injected through a `syscall` instruction found in its vDSO (rt_sigaction,
sigaltstack, brk, prctl(PR_GET_TID_ADDRESS)), using a scratch page mapped for the purpose and
unmapped afterwards, so the process's memory is left exactly as it was.
"""
from __future__ import annotations

import errno
import os
import signal
import struct

import psutil

from cxlfork.errors import CxlforkError
from cxlfork.native import ffi, lib

NT_PRSTATUS = 1
NT_X86_XSTATE = 0x202
REG_NAMES = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
             "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
             "gs_base", "ds", "es", "fs", "gs")
REGS_SIZE = 8 * len(REG_NAMES)
XSTATE_MAX = 16384
ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
NR = {"mmap": 9, "munmap": 11, "rt_sigaction": 13, "sigaltstack": 131, "brk": 12,
      "prctl": 157, "restart_syscall": 219}
PR_GET_TID_ADDRESS = 40


def _tasks(pid: int) -> list[int]:
    try:
        return sorted(t.id for t in psutil.Process(pid).threads())
    except psutil.NoSuchProcess:
        return []


def regs_unpack(raw: bytes) -> dict[str, int]:
    return dict(zip(REG_NAMES, struct.unpack(f"<{len(REG_NAMES)}Q", raw)))


def regs_pack(regs: dict[str, int]) -> bytes:
    return struct.pack(f"<{len(REG_NAMES)}Q", *(regs[n] & (2**64 - 1) for n in REG_NAMES))


def _signed(v: int) -> int:
    return v - 2**64 if v >= 2**63 else v


def restart_adjusted(regs: dict[str, int], live: bool) -> dict[str, int]:
    """Registers that re-run a syscall interrupted by the freeze.

    A process frozen inside a blocking syscall shows orig_rax = the syscall and rax =
    -ERESTART*. Rewind rip over the 2-byte `syscall` and put the number back in rax, so the
    syscall runs again when the registers are installed (orig_rax = -1 keeps the kernel from
    restarting it a second time). -ERESTART_RESTARTBLOCK (nanosleep, poll with timeout) restarts
    through restart_syscall in the live process; a restored clone has no restart block, so it
    gets -EINTR there, as in CRIU.
    """
    r = dict(regs)
    if _signed(r["orig_rax"]) < 0:
        return r
    ax = _signed(r["rax"])
    if ax in (-ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND):
        r["rax"], r["rip"] = r["orig_rax"], r["rip"] - 2
    elif ax == -ERESTART_RESTARTBLOCK:
        if live:
            r["rax"], r["rip"] = NR["restart_syscall"], r["rip"] - 2
        else:
            r["rax"] = -errno.EINTR & (2**64 - 1)
    r["orig_rax"] = 2**64 - 1
    return r


class Tracee:
    """A process frozen with PTRACE_SEIZE + PTRACE_INTERRUPT; detach() resumes it."""

    def __init__(self, pid: int, timeout_s: float = 10.0, tgid: int | None = None):
        self.pid = pid
        self.tgid = tgid or pid           # the process, for a thread
        self.attached = False
        self.held_signal = 0
        self.held_siginfo = None        # its siginfo (128 bytes), to queue it again as it was
        self.scratch = 0
        self.threads: list[Tracee] = []     # the other threads, for the main one
        e = lib.cx_seize(pid)
        if e < 0:
            e = -e
            if e == errno.EPERM:
                raise CxlforkError(f"cannot ptrace PID {pid}: operation not permitted (it is not "
                                   "yours, or is already traced, or yama ptrace_scope forbids "
                                   "it; run as root or as its owner)")
            if e == errno.ESRCH:
                raise CxlforkError(f"no process with PID {pid}")
            raise CxlforkError(f"cannot ptrace PID {pid}: {os.strerror(e)}")
        self.attached = True
        st = ffi.new("int *")
        e = lib.cx_wait(pid, int(timeout_s * 1000), st)
        if e < 0:
            self.detach()
            raise CxlforkError(f"PID {pid} did not stop within {timeout_s:g} s "
                               f"({os.strerror(-e)}); is it in uninterruptible sleep?")
        if os.WIFEXITED(st[0]) or os.WIFSIGNALED(st[0]):
            self.attached = False
            raise CxlforkError(f"process {pid} exited while being frozen")
        self.regs_raw = self.getregs_raw()
        self.regs = regs_unpack(self.regs_raw)

    def getregs_raw(self) -> bytes:
        buf = ffi.new(f"char[{REGS_SIZE}]")
        n = lib.cx_getregset(self.pid, NT_PRSTATUS, buf, REGS_SIZE)
        if n < 0:
            raise CxlforkError(f"PTRACE_GETREGSET(NT_PRSTATUS) on {self.pid}: {os.strerror(-n)}")
        return ffi.buffer(buf, n)[:]

    def xstate(self) -> bytes:
        buf = ffi.new(f"char[{XSTATE_MAX}]")
        n = lib.cx_getregset(self.pid, NT_X86_XSTATE, buf, XSTATE_MAX)
        if n < 0:
            raise CxlforkError(f"PTRACE_GETREGSET(NT_X86_XSTATE) on {self.pid}: "
                               f"{os.strerror(-n)}")
        return ffi.buffer(buf, n)[:]

    def rseq(self) -> dict | None:
        out = ffi.new("uint64_t[4]")
        e = lib.cx_get_rseq(self.pid, out)
        if e < 0:
            raise CxlforkError(f"PTRACE_GET_RSEQ_CONFIGURATION on {self.pid}: "
                               f"{os.strerror(-e)}")
        if out[0] == 0:
            return None
        return {"addr": out[0], "len": out[1], "flags": out[2], "sig": out[3]}

    def robust_list(self) -> tuple[int, int]:
        h, n = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        e = lib.cx_get_robust_list(self.pid, h, n)
        if e < 0:
            raise CxlforkError(f"get_robust_list({self.pid}): {os.strerror(-e)}")
        return h[0], n[0]

    # -- syscall injection -------------------------------------------------------------------
    def find_syscall_insn(self, vdso_start: int, vdso_end: int) -> None:
        with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as f:
            code = os.pread(f.fileno(), vdso_end - vdso_start, vdso_start)
        i = code.find(b"\x0f\x05")
        if i < 0:
            raise CxlforkError("no syscall instruction in the vDSO of PID "
                               f"{self.pid}; cannot query its signal handlers")
        self.syscall_ip = vdso_start + i

    def inject(self, name: str, *args: int) -> int:
        return self.inject_nr(NR[name], *args)

    def inject_nr(self, nr: int, *args: int) -> int:
        """inject() by syscall number."""
        a = [int(x) for x in args] + [0] * (6 - len(args))
        ret = ffi.new("long *")
        info = ffi.new("char[128]")
        self.injected = True
        e = lib.cx_inject(self.pid, self.regs_raw, self.syscall_ip, nr, *a, ret, info)
        if e < 0:
            name = next((k for k, v in NR.items() if v == nr), f"syscall {nr}")
            raise CxlforkError(f"injecting {name} into PID {self.pid}: {os.strerror(-e)}")
        if e > 0 and not self.held_signal:
            self.held_signal = e
            self.held_siginfo = ffi.buffer(info)[:]
        return ret[0]

    def map_scratch(self) -> int:
        r = self.inject("mmap", 0, 4096, 3, 0x22, -1, 0)   # RW, PRIVATE|ANONYMOUS
        if r < 0:
            raise CxlforkError(f"scratch mmap in PID {self.pid}: {os.strerror(-r)}")
        self.scratch = r
        return r

    def unmap_scratch(self) -> None:
        if self.scratch:
            self.inject("munmap", self.scratch, 4096)
            self.scratch = 0

    def read(self, addr: int, n: int) -> bytes:
        with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as f:
            return os.pread(f.fileno(), n, addr)

    def sigaction(self, sig: int) -> dict:
        r = self.inject("rt_sigaction", sig, 0, self.scratch, 8)
        if r < 0:
            raise CxlforkError(f"rt_sigaction({sig}) in PID {self.pid}: {os.strerror(-r)}")
        h, fl, rs, mask = struct.unpack("<4Q", self.read(self.scratch, 32))
        return {"sig": sig, "handler": h, "flags": fl, "restorer": rs, "mask": mask}

    def sigaltstack(self) -> dict:
        r = self.inject("sigaltstack", 0, self.scratch)
        if r < 0:
            raise CxlforkError(f"sigaltstack in PID {self.pid}: {os.strerror(-r)}")
        sp, flags, size = struct.unpack("<Qi4xQ", self.read(self.scratch, 24))
        return {"sp": sp, "flags": flags, "size": size}

    def tid_address(self) -> int:
        r = self.inject("prctl", PR_GET_TID_ADDRESS, self.scratch)
        if r < 0:
            raise CxlforkError(f"prctl(PR_GET_TID_ADDRESS) in PID {self.pid}: "
                               f"{os.strerror(-r)}")
        return struct.unpack("<Q", self.read(self.scratch, 8))[0]

    def brk(self) -> int:
        return self.inject("brk", 0)

    # -- resume ------------------------------------------------------------------------------
    def put_back_regs(self) -> None:
        """After injections: reinstall the original registers at once (re-running an
        interrupted syscall by hand, since we are at a syscall exit), so that even if cxlfork
        dies from here on, the process resumes correctly when the kernel detaches it."""
        if getattr(self, "injected", False):
            e = lib.cx_setregset(self.pid, NT_PRSTATUS,
                                 regs_pack(restart_adjusted(self.regs, live=True)), REGS_SIZE)
            if e < 0:
                raise CxlforkError(f"restoring the registers of PID {self.pid}: "
                                   f"{os.strerror(-e)}")
            self.injected = False

    def freeze_threads(self) -> None:
        """Freeze every other thread of the process too (one ptrace attach per thread), until
        no new thread shows up in /proc/PID/task."""
        seen = {self.pid}
        while True:
            new = [t for t in _tasks(self.pid) if t not in seen]
            if not new:
                return
            for t in new:
                seen.add(t)
                try:
                    self.threads.append(Tracee(t, tgid=self.pid))
                except CxlforkError:
                    if os.path.exists(f"/proc/{self.pid}/task/{t}"):
                        raise
                    # it exited meanwhile

    def detach(self) -> None:
        """Put the original registers back (if still needed) and resume the process."""
        for t in self.threads:
            t.detach()
        if not self.attached:
            return
        if getattr(self, "injected", False):
            self.put_back_regs()
        lib.cx_detach(self.pid, 0)
        self.attached = False
        if self.held_signal:
            # queued again to the thread it stopped, with its siginfo (a timer's signal stays
            # SI_TIMER with its value); lib falls back to tgkill
            lib.cx_requeue(self.tgid, self.pid, self.held_signal,
                           self.held_siginfo if self.held_siginfo else ffi.NULL)

    def kill(self) -> None:
        """SIGKILL it and wait until it is gone (as its tracer we see its death)."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        st = ffi.new("int *")
        for t in self.threads + [self]:     # traced threads are reaped before the leader
            for _ in range(100):
                if lib.cx_wait(t.pid, 5000, st) < 0 or os.WIFEXITED(st[0]) \
                        or os.WIFSIGNALED(st[0]):
                    break
            t.attached = False
