"""Helpers shared by the cxlfork tests: build conformance programs, run them, checkpoint and
restore through the real `cxlfork` command."""
from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROGS = os.path.join(HERE, "cxlfork_progs")
CXLFORK = [sys.executable, "-m", "cxlfork"]


def build_prog(name: str, out_dir: str) -> str:
    out = os.path.join(out_dir, name)
    if not os.path.exists(out):
        subprocess.run(["gcc", "-O1", "-mavx2", "-Wall", "-o", out,
                        os.path.join(PROGS, name + ".c")], check=True)
    return out


def readline(f, timeout=20.0) -> str:
    """One line from a pipe, with a timeout; reads the fd byte by byte so nothing is left in
    a Python buffer that select() cannot see."""
    fd = f.fileno()
    out = b""
    while not out.endswith(b"\n"):
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            raise TimeoutError("no output within %.0f s (got %r)" % (timeout, out))
        c = os.read(fd, 1)
        if not c:
            break
        out += c
    return out.decode()


def start(argv, cwd=None, env=None) -> subprocess.Popen:
    """Start a program that prints 'ready' once set up; returns the Popen after 'ready'."""
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
                         cwd=cwd, env=env)
    line = readline(p.stdout)
    assert line.strip() == "ready", f"program said {line!r}"
    return p


def go(p: subprocess.Popen, timeout=60.0) -> tuple[str, int, str]:
    """Send 'go', collect everything it prints, wait for its exit status."""
    p.stdin.write(b"go\n")
    p.stdin.flush()
    out, err = p.communicate(timeout=timeout)
    return out.decode(), p.returncode, (err or b"").decode()


def cxlfork(*args, check=True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(CXLFORK + [str(a) for a in args], capture_output=True, text=True,
                       close_fds=True, timeout=120, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"cxlfork {' '.join(map(str, args))} failed ({r.returncode}): "
                             f"{r.stderr}")
    return r


def restore_popen(image: str, *extra) -> subprocess.Popen:
    return subprocess.Popen(CXLFORK + ["restore", image, *map(str, extra)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, close_fds=True)


def new_store() -> str:
    """A fresh store directory on tmpfs (/dev/shm)."""
    return tempfile.mkdtemp(prefix="cxlfork-test-store-", dir="/dev/shm")


def rmtree(p: str) -> None:
    shutil.rmtree(p, ignore_errors=True)


def wait_file(path: str, proc: subprocess.Popen, timeout=30.0) -> str:
    """Wait until path exists (e.g. restore's --pidfile); fail if proc exits first."""
    import time
    t = time.monotonic()
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before writing {path}: "
                                 f"{proc.stderr.read().decode()}")
        if time.monotonic() - t > timeout:
            raise TimeoutError(path)
        time.sleep(0.01)
    with open(path) as f:
        return f.read()
