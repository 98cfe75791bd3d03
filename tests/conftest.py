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
