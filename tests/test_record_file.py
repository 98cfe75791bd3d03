"""Record file format, reports and the record/report CLI's handling of bad input (no kernel
needed except where marked), plus the idle-page bitmap arithmetic and span expansion."""
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from tiermem import record, reports
from tiermem.errors import TiermemError
from tiermem.samplers.base import Spans
from tiermem.samplers.idle import chunk_bytes, idle_bits, pfn_words, word_runs
from tiermem.samplers.trace import TraceSampler

PY = sys.executable
MB = 1 << 20


def _synthetic(nb=10, hot=(0x7f0000400000, 0x7f0000500000)) -> record.Record:
    """DAMON-like regions: 8 MiB at 0x7f0000000000, one 1 MiB region 10x hotter."""
    base = 0x7f0000000000
    batches = []
    for b in range(nb):
        starts = np.arange(base, base + 8 * MB, MB, dtype=np.uint64)
        w = np.where((starts >= hot[0]) & (starts < hot[1]), 10.0, 1.0)
        batches.append(Spans(np.full(8, 42), starts, np.full(8, MB), w, False, "vaddr",
                             100.0 + b, 101.0 + b))
    return record.Record.from_spans(batches, {"sampler": "damon", "kernel": "test"}, 100.0)


def test_roundtrip(tmp_path):
    r = _synthetic()
    f = str(tmp_path / "r.rec")
    r.save(f)
    q = record.load(f)
    assert q.nr_batches == 10 and q.meta["format"] == "tiermem-record" and q.meta["version"] == 1
    assert np.array_equal(q.addr, r.addr) and np.array_equal(q.weight, r.weight)
    assert q.batch_t[0, 0] == 0.0 and q.batch_t[-1, 1] == 10.0
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".record-")]


def test_span_expansion_to_pages():
    s = Spans([1, 2], [0x1000, 0x10000], [3 * 4096, 64], [2.0, 5.0], False, "vaddr", 0, 1)
    b = s.to_batch()
    assert b.addr.tolist() == [0x1000, 0x2000, 0x3000, 0x10000]
    assert b.weight.tolist() == [2, 2, 2, 5] and b.pid.tolist() == [1, 1, 1, 2]


def test_reports_hot_wss_heatmap(tmp_path):
    r = _synthetic()
    top = reports.hot(r, 3)
    assert top[0]["start"] == 0x7f0000400000 and top[0]["end"] == 0x7f0000500000
    assert top[0]["weight_per_page"] == 100.0 and top[0]["bytes"] == MB
    w = reports.wss(r)
    assert len(w) == 10 and all(x["wss_bytes"] == 8 * MB for x in w)
    out = str(tmp_path / "h.png")
    info = reports.heatmap_png(r, out, time_bins=10, addr_bins=8)
    assert os.path.getsize(out) > 1000 and info["addr_end"] - info["addr_start"] == 8 * MB
    grid, _, _ = reports.heatmap_grid(r, 10, 8)
    assert np.argmax(grid.sum(axis=1)) == 4        # the 5th MiB is the hot one


def test_precision_recall():
    pages = np.arange(100, dtype=np.uint64)
    scores = np.where(pages < 10, 5.0, 1.0)
    assert reports.precision_recall(pages, scores, np.arange(10), 10) == (1.0, 1.0)
    p, r = reports.precision_recall(pages, np.where(pages < 5, 5.0, 0.0), np.arange(10), 10)
    assert p == 1.0 and r == 0.5


def test_trace_sampler_replays_record_and_to_trace(tmp_path):
    r = _synthetic(nb=3)
    f = str(tmp_path / "r.rec")
    r.save(f)
    from tiermem.samplers.base import Target
    s = TraceSampler(f)
    got = []
    with s:
        s.start(Target())
        while not s.done:
            got.append(s.read())
        assert len(s.read()) == 0
    assert len(got) == 3 and all(len(b) == 8 * MB // 4096 for b in got)
    t = record.to_trace(r)
    assert t.epoch is not None and int(t.epoch.max()) == 2 and t.n_pages == 8 * MB // 4096
    tf = str(tmp_path / "t.npz")
    t.save(tf)
    s2 = TraceSampler(tf)
    with s2:
        s2.start(Target())
        b = s2.read()
    assert len(b) == 8 * MB // 4096


def test_corrupt_and_truncated_records(tmp_path):
    r = _synthetic()
    good = str(tmp_path / "good.rec")
    r.save(good)
    data = open(good, "rb").read()
    trunc = tmp_path / "trunc.rec"
    trunc.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.rec"
    junk.write_bytes(b"not a record at all")
    for f in (trunc, junk):
        with pytest.raises(TiermemError, match="corrupt or truncated"):
            record.load(str(f))
    # structurally wrong: offsets past the data
    bad = tmp_path / "bad.rec"
    with zipfile.ZipFile(good) as z, zipfile.ZipFile(bad, "w") as o:
        for n in z.namelist():
            d = z.read(n)
            if n == "batch_off.npy":
                import io
                a = np.load(io.BytesIO(d))
                a[-1] += 5
                buf = io.BytesIO()
                np.save(buf, a)
                d = buf.getvalue()
            o.writestr(n, d)
    with pytest.raises(TiermemError, match="batch_off"):
        record.load(str(bad))
    with pytest.raises(TiermemError, match="no such file"):
        record.load(str(tmp_path / "missing.rec"))


def _cli(*args):
    return subprocess.run([PY, "-m", "tiermem.cli", *args], capture_output=True, text=True,
                          timeout=120)


def _one_error_line(p, pattern):
    assert p.returncode != 0, p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tiermem: error:"), p.stderr
    assert pattern in lines[0], lines[0]


def test_cli_report_bad_files(tmp_path):
    junk = tmp_path / "junk.rec"
    junk.write_bytes(b"\x00" * 100)
    for verb in ("hot", "wss"):
        _one_error_line(_cli("report", verb, str(junk)), "corrupt or truncated")
    out = tmp_path / "h.png"
    _one_error_line(_cli("report", "heatmap", str(junk), "-o", str(out)), "corrupt")
    assert not out.exists()
    _one_error_line(_cli("report", "hot", str(tmp_path / "nope.rec")), "no such file")


def test_cli_report_json(tmp_path):
    f = str(tmp_path / "r.rec")
    _synthetic().save(f)
    p = _cli("report", "hot", f, "--top", "2", "--json")
    assert p.returncode == 0, p.stderr
    top = json.loads(p.stdout)
    assert top[0]["start"] == 0x7f0000400000
    p = _cli("report", "wss", f, "--json")
    assert json.loads(p.stdout)["summary"]["p50_bytes"] == 8 * MB
    p = _cli("report", "heatmap", f, "-o", str(tmp_path / "h.png"), "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["time_bins"] == 100


def test_cli_record_bad_input(tmp_path):
    out = tmp_path / "x.rec"
    _one_error_line(_cli("record", "999999", "-s", "pagemap", "--mode", "present", "-d", "1",
                         "-o", str(out)), "no process with pid 999999")
    _one_error_line(_cli("record", str(os.getpid()), "-s", "nosuch", "-o", str(out)),
                    "unknown sampler 'nosuch'")
    _one_error_line(_cli("record", str(os.getpid()), "-s", "pagemap", "--mode", "present",
                         "-d", "0", "-o", str(out)), "duration must be > 0")
    _one_error_line(_cli("record", str(os.getpid()), "-s", "pagemap", "--mode", "present",
                         "-o", str(tmp_path / "no" / "dir.rec")), "does not exist")
    _one_error_line(_cli("record", "-s", "ebpf", "-o", str(out)), "needs target PIDs")
    from tiermem.samplers.ebpf import MemSampler
    from tiermem.samplers.idle import IdleSampler
    for name, cls, why in (("idle", IdleSampler, "CONFIG_IDLE_PAGE_TRACKING"),
                           ("ebpf-mem", MemSampler, "not available")):
        if not cls.available()[0]:          # a sampler this kernel lacks
            _one_error_line(_cli("record", str(os.getpid()), "-s", name, "-d", "1",
                                 "-o", str(out)), why)
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".record-")]


# --- idle-page bitmap arithmetic ---------------------------------------------------------

def test_pfn_words_and_masks():
    pfns = np.array([0, 1, 63, 64, 130, 129], np.uint64)
    w, m = pfn_words(pfns)
    assert w.tolist() == [0, 1, 2]
    assert int(m[0]) == (1 | 2 | (1 << 63)) and int(m[1]) == 1 and int(m[2]) == (1 << 1 | 1 << 2)


def test_word_runs_merge_small_gaps():
    assert word_runs(np.array([0, 1, 2, 10, 500], np.uint64), gap=8) == [(0, 11), (500, 1)]
    assert word_runs(np.array([], np.uint64)) == []


def test_chunk_bytes_and_idle_bits():
    pfns = np.array([3, 70, 200], np.uint64)
    w, m = pfn_words(pfns)
    raw = np.frombuffer(chunk_bytes(0, 4, w, m), "<u8")
    assert raw.tolist() == [1 << 3, 1 << 6, 0, 1 << 8]
    # the kernel cleared the bit of PFN 70 (accessed)
    vals = np.array([1 << 3, 0, 1 << 8], np.uint64)
    assert idle_bits(pfns, w, vals).tolist() == [True, False, True]
    with pytest.raises(TiermemError):
        idle_bits(np.array([5000], np.uint64), w, vals)


def test_damon_mean_over_aggregations_splits_overlaps():
    """Regions of several DAMON aggregations overlap (split/merge between them): each page
    gets its summed nr_accesses over the aggregations divided by their number."""
    from tiermem.samplers.damon import mean_over_aggregations
    # aggregation 1: [0,10)=2 [10,20)=6; aggregation 2: [0,5)=1 [5,20)=3; [30,40)=0 never hot
    s = np.array([0, 10, 0, 5, 30], np.uint64)
    e = np.array([10, 20, 5, 20, 40], np.uint64)
    a = np.array([2, 6, 1, 3, 0], np.uint64)
    st, en, w = mean_over_aggregations(s, e, a, 2)
    assert st.tolist() == [0, 5, 10] and en.tolist() == [5, 10, 20]
    assert w.tolist() == [1.5, 2.5, 4.5]
    st, en, w = mean_over_aggregations(s[:0], e[:0], a[:0], 0)
    assert st.size == en.size == w.size == 0
