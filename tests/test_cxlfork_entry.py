"""`cxlfork checkpoint` without click (cxlfork.entry): the same command line gives the same
result and the same one-line errors as through the click CLI, which still takes everything
the quick parser does not (another verb, --help, unusual spellings)."""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from cxlfork.entry import parse_checkpoint
from cxlfork_util import CXLFORK, cxlfork, start

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cxlfork_progs", "worker.py")


@pytest.mark.parametrize("args,want", [
    (["12", "-o", "img"], {"pid": 12, "image": "img"}),
    (["--output=img", "12", "--kill", "--store", "/s", "--json"],
     {"pid": 12, "image": "img", "leave_running": False, "store": "/s", "as_json": True}),
    (["12", "-o", "a", "--kill", "--leave-running"], {"pid": 12, "image": "a"}),
])
def test_quick_parser_takes_the_plain_forms(args, want):
    base = {"pid": None, "image": None, "leave_running": True, "store": None, "as_json": False}
    assert parse_checkpoint(args) == dict(base, **want)


@pytest.mark.parametrize("args", [
    ["12"], ["-o", "img"], ["--help", "12", "-o", "i"], ["+12", "-o", "i"], ["12", "-oimg"],
    ["12", "-o"], ["12", "13", "-o", "i"], ["12", "-o", "i", "--bogus"], ["12", "-o", ""],
    ["12", "-o", "i", "--"], ["١٢", "-o", "i"],
])
def test_everything_else_goes_to_click(args):
    assert parse_checkpoint(args) is None


def test_same_errors_with_and_without_click(tmp_path):
    img = str(tmp_path / "img")
    quick = cxlfork("checkpoint", "999999", "-o", img, check=False)
    slow = cxlfork("checkpoint", "+999999", "-o", img, check=False)   # "+": click's int
    assert quick.returncode == slow.returncode == 1
    assert quick.stderr == slow.stderr == "cxlfork: error: no process with PID 999999\n"
    assert not os.path.exists(img)
    r = cxlfork("checkpoint", "12", check=False)                       # usage: click's
    assert r.returncode == 2 and "Missing option '-o' / '--output'" in r.stderr


def test_quick_checkpoint_imports_no_click_and_prints_the_summary(tmp_path):
    p = start([sys.executable, WORKER, "8"])
    store = tempfile.mkdtemp(prefix="cxlfork-test-store-", dir="/dev/shm")    # tmpfs
    try:
        img = str(tmp_path / "w.img")
        r = subprocess.run(CXLFORK[:1] + ["-X", "importtime"] + CXLFORK[1:] +
                           ["checkpoint", str(p.pid), "-o", img, "--store",
                            store],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        imported = {ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines()
                    if ln.startswith("import time:")}
        assert "cxlfork.tree" in imported and "click" not in imported
        assert r.stdout.startswith(f"checkpointed PID {p.pid} into {img}: ")
        assert r.stdout.rstrip().endswith("left running")
        cxlfork("rm", img)
    finally:
        p.kill()
        p.wait()
        shutil.rmtree(store, ignore_errors=True)
