"""Shared pytest fixtures: `cxl_vm`, the emulated CXL machine booted once per session.

    @pytest.mark.vm
    def test_something(cxl_vm):
        r = cxl_vm.run("numactl -H", timeout=60)          # shell string or argv list
        assert r.returncode == 0, r.stderr
        path = os.path.join(cxl_vm.workdir, "out")        # writable, same path host & guest
        cxl_vm.run([cxl_vm.python, "-c", "import tiermem"], check=True)

`cxl_vm` is an `emulation.machine.Machine`: 2 vCPUs, node 0 (2 GiB, CPUs) and node 1
(2 GiB, CPU-less, lower memory tier). Commands run as root with the project's venv first on
PATH and the work folder as the current directory. The guest is always torn down at the end
of the session (and dies with pytest if pytest is killed).
"""
from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def cxl_vm(tmp_path_factory):
    from emulation.machine import QEMU, Machine, prepare
    from tiermem.errors import TiermemError

    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    try:
        prepare(log=lambda msg: None)
    except TiermemError as e:
        pytest.skip(f"the emulated CXL machine's guest kernel is not available: {e}")
    machine = Machine(workdir=str(tmp_path_factory.mktemp("cxl-work")))
    try:
        machine.start(timeout=240)
        yield machine
    finally:
        machine.stop()


DAMON_RESET = (
    "d=/sys/kernel/mm/damon/admin/kdamonds; [ -d $d ] || exit 0; "
    "for k in $d/[0-9]*; do [ -d $k ] && echo off > $k/state 2>/dev/null; done; "
    "echo 0 > $d/nr_kdamonds 2>/dev/null; exit 0")


@pytest.fixture(autouse=True)
def _fresh_damon_in_guest(request):
    """Tests in the guest share one machine: start each with no kdamond left by an earlier
    (failed) test, so one failure does not cascade. Tests that check clean-up check their
    own leftovers after their own run."""
    if "cxl_vm" in request.fixturenames:
        request.getfixturevalue("cxl_vm").run(DAMON_RESET, timeout=60)
    yield


def unprivileged_cannot_read_checkout() -> str | None:
    """Why the unprivileged user (nobody, 65534) cannot import this checkout, or None.

    Tests of 'a non-root caller is refused' run the project's code as nobody; in a checkout
    under a directory only root may enter (e.g. a 0700 /tmp) they cannot import it at all."""
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    probe = os.path.join(root, "tiermem", "__init__.py")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "test", "-r", probe], capture_output=True)
    if r.returncode != 0:
        return (f"the unprivileged user (uid 65534) cannot read this checkout ({probe}): a "
                f"parent directory is closed to others, so its code cannot run as non-root")
    return None
