"""demo-out/demo.json: the writer refuses anything but measured figures (unit test of the
writer, no machine), and one real short demo run (the emulated CXL machine, vm mark) writes
a demo.json of the documented shape whose every figure came from the workloads."""
import json
import math
import os
import subprocess
import sys

import pytest

from emulation.demo_json import write_demo_json
from tiermem.errors import TiermemError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(w, m, t90=3.5, share=0.9, rate=1e6):
    return {"workload": w, "mode": m, "time_to_90_s": t90, "hot_fast_share": share,
            "work_rate": rate, "series": [[1, 0.1]], "verify_ok": True}


def test_writer_keeps_the_figures_only(tmp_path):
    p = write_demo_json([run("dense", "kernel"), run("sparse", "tiermemd-m5", None, 0.5, 7)],
                        str(tmp_path / "demo.json"))
    d = json.load(open(p))
    assert d == {"runs": [
        {"workload": "dense", "mode": "kernel", "time_to_90_s": 3.5, "hot_fast_share": 0.9,
         "work_rate": 1e6},
        {"workload": "sparse", "mode": "tiermemd-m5", "time_to_90_s": None,
         "hot_fast_share": 0.5, "work_rate": 7.0}]}


@pytest.mark.parametrize("bad,msg", [
    (dict(work_rate=float("nan")), "work_rate is nan, not a measured number"),
    (dict(work_rate=None), "work_rate is None"),
    (dict(hot_fast_share="0.5"), "hot_fast_share is '0.5'"),
    (dict(hot_fast_share=1.5), "not a share in [0, 1]"),
    (dict(time_to_90_s=float("inf")), "time_to_90_s is inf"),
    (dict(mode="tpp"), "mode one of"),
    (dict(work_rate=-1.0), "negative"),
])
def test_writer_refuses_what_was_not_measured(tmp_path, bad, msg):
    r = run("dense", "kernel")
    r.update(bad)
    with pytest.raises(TiermemError, match=None) as e:
        write_demo_json([r], str(tmp_path / "demo.json"))
    assert msg in str(e.value)
    assert not os.listdir(tmp_path)                    # nothing half-written


@pytest.mark.vm
@pytest.mark.slow
def test_quick_demo_writes_measured_demo_json(tmp_path):
    import shutil
    from emulation.machine import QEMU, prepare
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    try:
        prepare(log=lambda msg: None)
    except TiermemError as e:
        pytest.skip(f"the emulated CXL machine's guest kernel is not available: {e}")
    r = subprocess.run([sys.executable, "-m", "emulation", "demo", "--quick", "--seconds",
                        "20", "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=1800, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.load(open(tmp_path / "demo.json"))
    assert sorted((x["workload"], x["mode"]) for x in d["runs"]) == [
        ("dense", "kernel"), ("dense", "tiermemd-m5"), ("sparse", "kernel"),
        ("sparse", "tiermemd-m5")]
    for x in d["runs"]:
        assert set(x) == {"workload", "mode", "time_to_90_s", "hot_fast_share", "work_rate"}
        assert x["time_to_90_s"] is None or (isinstance(x["time_to_90_s"], float)
                                             and 0 <= x["time_to_90_s"] <= 25)
        assert isinstance(x["hot_fast_share"], float) and 0 <= x["hot_fast_share"] <= 1
        assert isinstance(x["work_rate"], float) and math.isfinite(x["work_rate"])
        assert x["work_rate"] > 0                       # the workload really ran
    # measured, not made up: both modes of a workload did not give identical figures
    by = {(x["workload"], x["mode"]): x for x in d["runs"]}
    assert by[("dense", "kernel")]["work_rate"] != by[("dense", "tiermemd-m5")]["work_rate"]
    assert (tmp_path / "demo-tiermemd.png").stat().st_size > 0
    assert "hot fast share" in r.stdout and "vs kernel" in r.stdout
