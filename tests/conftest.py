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

import os
import shutil

import pytest

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


UNPRIVILEGED = 65534           # nobody


def unprivileged_cannot_read_checkout() -> str | None:
    """Why the unprivileged user (nobody, 65534) cannot read this checkout, or None (then
    run_unprivileged runs it through a readable view of the checkout)."""
    import subprocess
    probe = os.path.join(CHECKOUT, "tiermem", "__init__.py")
    r = subprocess.run(["setpriv", f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}",
                        "--clear-groups", "test", "-r", probe], capture_output=True)
    if r.returncode != 0:
        return (f"the unprivileged user (uid {UNPRIVILEGED}) cannot read this checkout "
                f"({probe}): a parent directory is closed to others")
    return None


_view_dir: list[str] = []


def _view() -> str:
    """An empty directory, mode 0755, under a place every user can search (/dev/shm or
    /tmp), removed at exit: the mount point of the checkout's readable view."""
    import atexit
    import stat
    import tempfile
    if not _view_dir:
        base = next((b for b in ("/dev/shm", "/tmp", "/run") if os.path.isdir(b)
                     and os.stat(b).st_mode & stat.S_IXOTH), None)
        if base is None:
            raise RuntimeError("no directory searchable by every user for the checkout view")
        d = tempfile.mkdtemp(prefix="tiermem-view-", dir=base)
        os.chmod(d, 0o755)
        atexit.register(os.rmdir, d)
        _view_dir.append(d)
    return _view_dir[0]


def run_unprivileged(argv, uid: int = UNPRIVILEGED, env: dict | None = None,
                     cwd: str | None = None, **kw):
    """subprocess.run(argv) as uid (setpriv: real and effective ids, no groups, no
    capabilities).

    When uid cannot read this checkout (it sits under a directory closed to others, e.g. a
    clone in a 0700 /tmp/xyz), the command runs in a private mount namespace (unshare -m) in
    which the checkout is also bind-mounted at a directory every user can reach, and every
    path into the checkout in argv, env and cwd points there instead: the same files (the
    venv's interpreter and packages, the project's code) run as the same user, checked the
    same way; nothing is copied or loosened, and the mount goes away with the namespace."""
    import re
    import subprocess
    pre = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    if unprivileged_cannot_read_checkout() is None:
        return subprocess.run(pre + [str(a) for a in argv], env=env, cwd=cwd, **kw)
    view = _view()

    def m(v):
        return re.sub(re.escape(CHECKOUT) + r"(?=/|:|$)", view, str(v))

    env = {k: m(v) for k, v in (os.environ if env is None else env).items()}
    # the venv's editable install maps the packages to the checkout's own paths: put the
    # view's package roots first (the same directories, as pyproject.toml lays them out)
    env["PYTHONPATH"] = ":".join(filter(None, [view, os.path.join(view, "daemon"),
                                               env.get("PYTHONPATH")]))
    script = 'mount --bind "$1" "$2" && cd "$3" || exit 125; shift 3; exec "$@"'
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script,
                           "view", CHECKOUT, view, m(cwd or os.getcwd()), *pre,
                           *[m(a) for a in argv]], env=env, **kw)
