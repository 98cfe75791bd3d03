"""`tiermem record`: sample a process's (or a node's) memory accesses into a record file."""
from __future__ import annotations

import os

import click

from tiermem.cli.common import echo_json, progress_done, progress_line
from tiermem.errors import TiermemError


def _parse_range(s: str) -> tuple[int, int]:
    try:
        a, b = s.split("-", 1)
        lo, hi = int(a, 0), int(b, 0)
    except ValueError:
        raise TiermemError(f"bad --phys-range {s!r}: expected START-END (bytes, hex ok)") from None
    if not 0 <= lo < hi:
        raise TiermemError(f"bad --phys-range {s!r}: need 0 <= START < END")
    return lo, hi


def _list_samplers(as_json: bool) -> None:
    from tiermem import damon_sysfs
    from tiermem.samplers import availability
    from tiermem.samplers.damon import tracepoint_available
    from tiermem.samplers.ebpf import hint_delay_available
    av = availability()
    feats = damon_sysfs.detect_features()
    running = damon_sysfs.running_kdamonds()
    modes = {"damon results from damon_aggregated + BPF": tracepoint_available(),
             "ebpf hint-fault delay weights (kprobes)": hint_delay_available()}
    if as_json:
        echo_json({"samplers": {k: {"available": ok, "reason": why} for k, (ok, why) in av.items()},
                   "modes": {k: {"available": ok, "reason": why}
                             for k, (ok, why) in modes.items()},
                   "damon_features": feats, "damon_running_kdamonds": running})
        return
    click.echo("samplers:")
    for k, (ok, why) in av.items():
        click.echo(f"  {k:<9} {'yes' if ok else 'no '}  {why}")
    for k, (ok, why) in modes.items():
        click.echo(f"  {k}: {'yes' if ok else 'no (' + why + ')'}")
    click.echo(f"DAMON features of this kernel ({os.uname().release}):")
    for f in feats:
        click.echo(f"  {f['name']:<19} since {f['since']:<5} {'yes' if f['present'] else 'no '}"
                   f"  {f['note'] if not f['present'] else f['what']}")
    for k in running:
        click.echo(f"  running: kdamond {k['index']} pid {k['pid']} ({k['operations']})")


@click.command("record")
@click.argument("pids", nargs=-1, type=int)
@click.option("--sampler", "-s", "sampler_name", default="damon", show_default=True,
              help="damon, ebpf, ebpf-mem, idle, pagemap or trace (see --list-samplers).")
@click.option("--duration", "-d", type=float, default=10.0, show_default=True,
              help="Seconds to sample.")
@click.option("--interval", "-i", type=float, default=None,
              help="Seconds between reads [default: DAMON aggregation interval, else 1 s].")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="tiermem.record",
              show_default=True, help="Record file to write.")
@click.option("--node", type=int, multiple=True, help="DAMON paddr: monitor this node's memory.")
@click.option("--phys-range", multiple=True, help="DAMON paddr: START-END physical bytes.")
@click.option("--sample-us", type=int, default=5000, show_default=True,
              help="DAMON sampling interval (microseconds).")
@click.option("--aggr-us", type=int, default=100000, show_default=True,
              help="DAMON aggregation interval (microseconds).")
@click.option("--update-us", type=int, default=1000000, show_default=True,
              help="DAMON target update interval (microseconds).")
@click.option("--min-regions", type=int, default=10, show_default=True)
@click.option("--max-regions", type=int, default=1000, show_default=True)
@click.option("--attach-kdamond", type=int, default=None,
              help="DAMON: read a running kdamond's results (read-only) instead of starting one.")
@click.option("--damon-results", default="auto", show_default=True,
              type=click.Choice(["auto", "tracepoint", "snapshot"]),
              help="DAMON own kdamond: read results from the damon_aggregated tracepoint "
                   "with BPF, or from tried-regions snapshots (auto: tracepoint when bcc and "
                   "the event are there).")
@click.option("--force", is_flag=True,
              help="DAMON: turn off running/stale kdamonds and take the interface over.")
@click.option("--mode", default="soft-dirty", show_default=True,
              type=click.Choice(["soft-dirty", "present", "swapped"]), help="pagemap mode.")
@click.option("--trace-file", type=click.Path(), help="trace sampler: record or trace to replay.")
@click.option("--list-samplers", is_flag=True, help="Show which samplers and DAMON features "
              "this kernel has, and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (or the list) as JSON.")
def command(pids, sampler_name, duration, interval, output, node, phys_range, sample_us,
            aggr_us, update_us, min_regions, max_regions, attach_kdamond, damon_results,
            force, mode, trace_file, list_samplers, as_json):
    """Sample the memory accesses of PIDS (or of physical memory) into a record file."""
    if list_samplers:
        return _list_samplers(as_json)
    from tiermem import damon_sysfs, record
    from tiermem.samplers import REGISTRY, Target
    from tiermem.samplers.damon import DamonSampler
    from tiermem.samplers.pagemap import PagemapSampler
    from tiermem.samplers.trace import TraceSampler
    if sampler_name not in REGISTRY:
        raise TiermemError(f"unknown sampler {sampler_name!r} (have: {', '.join(REGISTRY)})")
    ranges = [_parse_range(r) for r in phys_range] + \
        [damon_sysfs.node_phys_range(n) for n in node]
    target = Target(pids=list(pids), phys_ranges=ranges)
    if sampler_name == "damon":
        s = DamonSampler(sample_us, aggr_us, update_us, min_regions, max_regions, force,
                         attach_kdamond, damon_results)
        if interval is None:
            interval = max(aggr_us / 1e6, 0.1) if attach_kdamond is None else 1.0
    elif sampler_name == "pagemap":
        s = PagemapSampler(mode)
    elif sampler_name == "trace":
        if not trace_file:
            raise TiermemError("the trace sampler needs --trace-file")
        s = TraceSampler(trace_file)
    else:
        s = REGISTRY[sampler_name]()
    if sampler_name not in ("trace",) and not target.pids and not (
            sampler_name == "damon" and (ranges or attach_kdamond is not None)):
        raise TiermemError(f"sampler {sampler_name} needs target PIDs"
                           + (" (or --node / --phys-range / --attach-kdamond for DAMON)"
                              if sampler_name == "damon" else ""))
    interval = interval or 1.0
    ok, why = s.available()
    if not ok:
        raise TiermemError(f"sampler {sampler_name} not available: {why}")
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise TiermemError(f"cannot write {output}: directory {out_dir} does not exist")

    def progress(el, total, n):
        progress_line(f"recording with {sampler_name}: {el:5.1f} / {total:.1f} s, "
                      f"{n} batches")
    try:
        rec = record.record(s, target, duration, interval, progress)
    finally:
        progress_done()
    rec.save(output)
    m = rec.meta
    summary = {"file": output, "sampler": sampler_name, "batches": rec.nr_batches,
               "spans": int(rec.addr.size), "duration_s": round(m["duration_s"], 3),
               "cpu_seconds": round(m["cpu_seconds"], 4),
               "setup_cpu_seconds": round(m["setup_cpu_seconds"], 4),
               "cpu_percent_of_one_core": round(100 * max(m["cpu_seconds"] - m["setup_cpu_seconds"], 0)
                                                / max(m["duration_s"], 1e-9), 3),
               "bytes": os.path.getsize(output)}
    if "ended_early" in m:
        summary["ended_early"] = m["ended_early"]
    if as_json:
        echo_json(summary)
    else:
        click.echo(f"wrote {output}: {summary['batches']} batches, {summary['spans']} spans, "
                   f"{summary['bytes'] / 1024:.1f} KiB; sampled {summary['duration_s']:.2f} s "
                   f"at {summary['cpu_percent_of_one_core']:.3f} % of one core "
                   f"(+{summary['setup_cpu_seconds']:.2f} s CPU to start)")
    if "ended_early" in m:
        raise TiermemError(f"{m['ended_early']} after {m['duration_s']:.1f} s; the "
                           f"{rec.nr_batches} batches sampled until then are in {output}")
