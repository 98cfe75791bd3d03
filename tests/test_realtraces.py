"""emulation/realtraces.py (the real programs bench_policies traces): bad names are one
error line and a non-zero exit; --list names each program's cache file; the sqlite recipe's
SQL is deterministic and runs in the real sqlite3."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "emulation.realtraces", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, **kw)


def test_unknown_program_is_one_error_line(tmp_path):
    r = _run("--only", "nosuch", "--cache", str(tmp_path))
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        "realtraces: error: real trace: unknown program 'nosuch' (known: redis, sqlite, gcc, "
        "python)"]
    assert os.listdir(tmp_path) == []


def test_list_names_the_cache_files(tmp_path):
    r = _run("--list", "--cache", str(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == ["redis", "sqlite", "gcc", "python"]
    assert all(" missing " in ln and str(tmp_path) in ln for ln in lines)


@pytest.mark.skipif(not shutil.which("sqlite3"), reason="needs sqlite3 (apt-get install sqlite3)")
def test_sqlite_query_mix_is_deterministic_and_runs(tmp_path):
    from emulation.realtraces import _sqlite_sql
    a, b = tmp_path / "a.sql", tmp_path / "b.sql"
    _sqlite_sql(str(a), rows=500, queries=300)
    _sqlite_sql(str(b), rows=500, queries=300)
    assert a.read_bytes() == b.read_bytes()
    r = subprocess.run(["sqlite3", ":memory:", f".read {a}"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and not r.stderr, r.stderr
    assert len(r.stdout.splitlines()) >= 200          # the SELECTs answered
