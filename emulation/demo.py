"""`make demo` / `python -m emulation demo`: tiering on the emulated CXL machine, step by step.

Boots the guest, shows `tiermem topo` and `tiermem topo --measure` from inside it, starts
the hotrange workload with all its pages on the slow node 1, shows `tiermem numastat PID`,
moves the workload's hot range to node 0 with `tiermem move`, shows numastat again and has
the workload verify every word of its memory. Then the tiering part, in the same guest:
`python -m tiermemd.demo` (daemon/tiermemd/demo.py) runs a workload whose hot set starts on
the slow node under tiermemd, then the same workload under the kernel's NUMA-balancing
tiering, with a live table streamed here; its curves are plotted here into
OUT_DIR/demo-tiermemd.png (OUT_DIR: $TIERMEM_DEMO_OUT or demo-out/ in the current folder). Exits non-zero with one line if any step fails.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
import time

import click

from emulation.machine import Machine
from tiermem.errors import TiermemError

WORKLOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workloads", "hotrange.py")


_T0 = [None]


def _step(title: str) -> None:
    """A step's heading, with the time since the demo started (where the minutes go)."""
    now = time.monotonic()
    if _T0[0] is None:
        _T0[0] = now
    click.secho(f"\n== [{now - _T0[0]:5.0f} s] {title}", bold=True)


def _show(m: Machine, cmd: str, timeout: float = 300) -> str:
    click.secho(f"guest$ {cmd}", fg="cyan")
    r = m.run(cmd, timeout=timeout)
    click.echo(r.stdout, nl=False)
    if r.returncode != 0:
        raise TiermemError(f"demo step failed (exit {r.returncode}): {cmd}: "
                           f"{(r.stderr.strip().splitlines() or [''])[-1]}")
    return r.stdout


def _wait_file(path: str, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            time.sleep(0.2)
    raise TiermemError(f"demo: {what} did not appear within {timeout:.0f} s ({path})")


def _stream_tiering(m: Machine, work: str, out_dir: str, seconds: int) -> list[dict]:
    """Runs emulation.tierdemo in the guest in the background (dense and sparse workloads,
    tiermemd-m5 and the kernel), prints its progress here as it comes (it writes to the
    shared work folder) and returns its runs."""
    log, rc, out, pid = (os.path.join(work, n) for n in ("tiering.log", "tiering.rc",
                                                         "tiering.json", "tiering.pid"))
    cmd = (f"python -m emulation.tierdemo --workloads dense,sparse --seconds {seconds} "
           f"--out {out}")
    click.secho(f"guest$ {cmd}", fg="cyan")
    inner = f"{cmd} > {log} 2>&1; echo $? > {rc}.tmp; mv {rc}.tmp {rc}"
    m.run(f"setsid sh -c {shlex.quote(inner)} > /dev/null 2>&1 < /dev/null & echo $! > {pid}",
          timeout=60, check=True)
    limit = 4 * seconds + 900            # four runs + start-ups under TCG
    deadline = time.monotonic() + limit
    shown = 0
    while True:
        done = os.path.exists(rc)
        try:
            with open(log) as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        if len(text) > shown:
            complete = text[shown:] if done else text[shown:text.rfind("\n") + 1]
            click.echo(complete, nl=False)
            shown += len(complete)
        if done:
            break
        if time.monotonic() > deadline:
            m.run(f"kill -TERM -- -$(cat {pid})", timeout=60)     # its process group
            raise TiermemError(f"demo: the tiering part did not finish in time ({limit} s)")
        time.sleep(0.5)
    status = open(rc).read().strip()
    if status != "0":
        last = (text.strip().splitlines() or ["no output"])[-1]
        raise TiermemError(f"demo: the tiering part failed (exit {status}): {last}")
    with open(out) as f:
        return json.load(f)["runs"]


def write_results(runs: list[dict], out_dir: str) -> tuple[str, str]:
    """demo.json (figures only, checked) and the plot of every run's curve, in out_dir."""
    from emulation.demo_json import write_demo_json
    from tiermemd.demo import plot
    os.makedirs(out_dir, exist_ok=True)
    path = write_demo_json(runs, os.path.join(out_dir, "demo.json"))
    png = os.path.join(out_dir, "demo-tiermemd.png")
    curves = {f"{r['workload']}: {r['mode']}": [tuple(x) for x in r["series"]] for r in runs}
    plot(curves, png, "hot-access fast-tier share (workload's own); hot set starts slow")
    return path, png


def print_table(runs: list[dict]) -> None:
    click.echo(f"{'workload':10} {'mode':12} {'time to 90 %':>13} {'hot fast share':>15} "
               f"{'work rate':>16} {'vs kernel':>10}")
    kern = {r["workload"]: r for r in runs if r["mode"] == "kernel"}
    for r in runs:
        t = "never" if r["time_to_90_s"] is None else f"{r['time_to_90_s']:.1f} s"
        k = kern.get(r["workload"])
        ratio = f"{r['work_rate'] / k['work_rate']:.2f}x" if k and k["work_rate"] else "-"
        click.echo(f"{r['workload']:10} {r['mode']:12} {t:>13} {r['hot_fast_share']:>15.3f} "
                   f"{r['work_rate'] / 1e6:>10.2f} M/s {ratio:>10}")


def main(size_mb: int = 128, hot_mb: int = 16, out_dir: str | None = None,
         tiering_seconds: int = 40, quick: bool = False) -> None:
    """quick: skip `topo --measure` and the tiermem-move walk-through (the tiering part and
    demo.json only; what the test runs)."""
    out_dir = os.path.abspath(out_dir or os.environ.get("TIERMEM_DEMO_OUT", "demo-out"))
    work = tempfile.mkdtemp(prefix="tiermem-demo-", dir="/var/tmp")
    info = os.path.join(work, "hotrange.json")
    try:
        _step("boot the emulated CXL machine (QEMU TCG: node 0 = CPUs + DRAM, "
              "node 1 = CPU-less CXL-like memory)")
        with Machine(workdir=work).start(log=lambda msg: click.echo(f"  {msg}")) as m:
            if not quick:
                _step("memory topology seen by the guest kernel")
                _show(m, "tiermem topo")
                _step("measured latency and bandwidth (TCG: both nodes are host DRAM, so the "
                      "numbers are alike; the tiering comes from SLIT/HMAT)")
                _show(m, "tiermem topo --measure --size-mb 16", timeout=600)
                _step(f"start the hotrange workload: {size_mb} MiB bound to node 1, first "
                      f"{hot_mb} MiB hot")
                _show(m, f"nohup python {WORKLOAD} --size-mb {size_mb} --hot-mb {hot_mb} "
                         f"--node 1 --info {info} > {work}/hotrange.log 2>&1 & echo started")
                w = _wait_file(info, 300, "the workload's info file")
                pid, rng = w["pid"], f"{w['hot_start']:#x}-{w['hot_end']:#x}"
                click.echo(f"  pid {pid}: {w['pages_on_node']}/{w['pages']} pages on node 1, "
                           f"hot range {rng}")
                numastat = (f"tiermem numastat {pid} | awk 'NR <= 3 || /^{w['start']:x}-/'"
                            f"  # totals + the workload's mapping")
                _step("placement before")
                _show(m, numastat)
                _step("move the hot range to the fast node")
                _show(m, f"tiermem move {pid} --to 0 --range {rng}")
                _step("placement after")
                _show(m, numastat)
                _step("the workload verifies every word of its memory")
                _show(m, f"kill -USR1 {pid} && echo requested")
                v = _wait_file(info + ".verify", 300, "the workload's verification")
                _show(m, f"kill {pid} && echo stopped")
                hot_pages = (w["hot_end"] - w["hot_start"]) // 4096
                on0 = v["pages_per_node"].get("0", 0)
                click.echo(f"  contents: {'intact' if v['ok'] else 'CORRUPT'} "
                           f"({v['words']} words checked, {v['bad_words']} wrong); pages per "
                           f"node now {v['pages_per_node']}; hot range = {hot_pages} pages")
                if not v["ok"]:
                    raise TiermemError(f"demo: {v['bad_words']} words of the workload's memory "
                                       f"changed after the move")
                if on0 < hot_pages:
                    raise TiermemError(f"demo: only {on0} of the {hot_pages} hot pages are on "
                                       f"node 0 after the move")
                click.echo("  done: the hot range is on node 0, the cold rest on node 1, data intact")
            _step("tiering: tiermemd next to the kernel's NUMA-balancing tiering, same "
                  "workload (hot set on the slow node at start)")
            runs = _stream_tiering(m, work, out_dir, tiering_seconds)
        path, png = write_results(runs, out_dir)
        _step("side by side (each figure the workload's own, same run)")
        print_table(runs)
        _step(f"done; figures: {path}; plot of the hot-access fast-tier share: {png}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except TiermemError as e:
        click.echo(f"tiermem: error: {e}", err=True)
        sys.exit(1)
