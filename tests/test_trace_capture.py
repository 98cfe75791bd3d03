"""`tiermem trace` under valgrind lackey, as a user runs it: the tracer dies with tiermem
(SIGKILL), Ctrl-C writes what was kept, and exec is followed through a wrapper."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tiermem import trace as tracefmt

pytestmark = pytest.mark.skipif(not shutil.which("valgrind"),
                                reason="needs valgrind (Debian: apt-get install valgrind)")

# runs until stopped; ignores SIGPIPE as python3 does, so a valgrind whose log pipe lost its
# reader (tiermem killed) runs on instead of dying of SIGPIPE
LOOP = ["/bin/sh", "-c", "trap '' PIPE; while :; do :; done"]


def _start(tmp_path, *args):
    return subprocess.Popen([sys.executable, "-m", "tiermem.cli", "trace", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, cwd=tmp_path)


def _wait(cond, what, limit=120.0):
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.1)


def _valgrind_of(p) -> psutil.Process:
    me = psutil.Process(p.pid)
    _wait(lambda: me.children(), "tiermem trace to start valgrind")
    return me.children()[0]


def _kept_something(err_fd) -> callable:
    """A condition: tiermem's progress line on stderr shows kept accesses."""
    os.set_blocking(err_fd, False)
    buf = [b""]

    def cond():
        try:
            buf[0] += os.read(err_fd, 65536)
        except BlockingIOError:
            pass
        lines = buf[0].replace(b"\r", b"\n").split(b"\n")
        return any(b"M kept" in ln and b" 0.00 M kept" not in ln for ln in lines)
    return cond


def test_tracer_dies_with_tiermem_on_sigkill(tmp_path):
    p = _start(tmp_path, "-o", "t.npz", "--", *LOOP)
    vg = _valgrind_of(p)
    _wait(_kept_something(p.stderr.fileno()), "the first kept accesses")
    p.kill()
    p.wait()
    try:
        vg.wait(timeout=60)                  # before: valgrind ran on (and ignores SIGTERM)
    except psutil.TimeoutExpired:
        vg.kill()
        pytest.fail("valgrind outlived tiermem trace killed by SIGKILL")


def test_sigint_writes_what_was_kept(tmp_path):
    p = _start(tmp_path, "-o", "t.npz", "--sample-every", "1", "--", *LOOP)
    vg = _valgrind_of(p)
    _wait(_kept_something(p.stderr.fileno()), "the first kept accesses")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert b"Aborted" not in err and b"interrupted" in err
    tr = tracefmt.load(str(tmp_path / "t.npz"))
    assert len(tr) > 0 and tr.meta["interrupted"] is True
    assert not vg.is_running()


def test_follows_exec_through_a_wrapper(tmp_path):
    # `env` execs sh, which counts to 3000: the real work is after the exec
    cmd = ["env", "/bin/sh", "-c", "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done"]
    seen = {}
    for flag in ("--follow-exec", "--no-follow-exec"):
        out = tmp_path / f"{flag}.npz"
        r = subprocess.run([sys.executable, "-m", "tiermem.cli", "trace", "-o", str(out),
                            "--sample-every", "64", flag, "--", *cmd], capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        seen[flag] = tracefmt.load(str(out)).meta["data_accesses"]
    assert seen["--follow-exec"] > 5 * seen["--no-follow-exec"], seen


def test_max_accesses_stops_a_long_run_at_a_fixed_prefix():
    """A program that would run for ever is stopped once max_accesses data accesses were
    seen: exactly that many are counted, about 1 in N kept, and the meta says so."""
    from tiermem.trace_capture import capture
    t0 = time.monotonic()
    tr = capture(LOOP, sample_every=4, max_accesses=300_000)
    assert time.monotonic() - t0 < 300
    assert tr.meta["data_accesses"] == 300_000
    assert tr.meta["interrupted"] is True and tr.meta["stopped_at_accesses"] == 300_000
    assert abs(len(tr) - 75_000) < 3_000
