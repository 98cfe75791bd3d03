"""`tiermem report`: heatmap, working-set size and hottest ranges of a record file."""
from __future__ import annotations

import click

from tiermem.cli.common import echo_json
from tiermem.errors import TiermemError


def _load(path):
    from tiermem import record
    return record.load(path)


def _size(n: float) -> str:
    for unit, f in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= f:
            return f"{n / f:,.1f} {unit}"
    return f"{n:,.0f} B"


@click.group("report")
def command():
    """Reports on a record file written by `tiermem record`."""


@command.command("heatmap")
@click.argument("file", type=click.Path())
@click.option("--output", "-o", default="heat.png", show_default=True, help="PNG to write.")
@click.option("--time-bins", type=int, default=100, show_default=True)
@click.option("--addr-bins", type=int, default=200, show_default=True)
@click.option("--addr-range", default=None, help="START-END bytes (default: the busiest "
              "address cluster).")
@click.option("--pid", type=int, default=None, help="Only this process.")
@click.option("--json", "as_json", is_flag=True, help="Print what was drawn as JSON.")
def heatmap(file, output, time_bins, addr_bins, addr_range, pid, as_json):
    """Access heatmap: address x time, colour = accesses per page."""
    from tiermem import reports
    from tiermem.cli.record import _parse_range
    if time_bins < 1 or addr_bins < 1:
        raise TiermemError("--time-bins and --addr-bins must be >= 1")
    rng = _parse_range(addr_range) if addr_range else None
    info = reports.heatmap_png(_load(file), output, time_bins, addr_bins, rng, pid)
    if as_json:
        echo_json(info)
    else:
        click.echo(f"wrote {output}: {info['addr_start']:#x}-{info['addr_end']:#x} "
                   f"({_size(info['addr_end'] - info['addr_start'])}) x "
                   f"{info['t_start_s']:.1f}-{info['t_end_s']:.1f} s")


@command.command("wss")
@click.argument("file", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def wss(file, as_json):
    """Working-set size (bytes of pages with accesses) per batch over time."""
    import numpy as np
    from tiermem import reports
    rows = reports.wss(_load(file))
    sizes = np.array([r["wss_bytes"] for r in rows], np.float64)
    summary = {}
    if sizes.size:
        summary = {f"p{p}_bytes": float(np.percentile(sizes, p)) for p in (0, 50, 90, 100)}
    if as_json:
        echo_json({"batches": rows, "summary": summary})
        return
    click.echo(f"{'t_start (s)':>12} {'t_end (s)':>10} {'working set':>14} {'pages':>10}")
    for r in rows:
        click.echo(f"{r['t_start_s']:>12.2f} {r['t_end_s']:>10.2f} "
                   f"{_size(r['wss_bytes']):>14} {r['pages']:>10}")
    if summary:
        click.echo("percentiles: " + ", ".join(f"{k[:-6]} {_size(v)}" for k, v in summary.items()))


@command.command("hot")
@click.argument("file", type=click.Path())
@click.option("--top", "-n", type=int, default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def hot(file, top, as_json):
    """The hottest address ranges over the whole record."""
    from tiermem import reports
    rows = reports.hot(_load(file), top)
    if as_json:
        echo_json(rows)
        return
    click.echo(f"{'rank':>4} {'pid':>7} {'start':>18} {'end':>18} {'size':>11} "
               f"{'accesses/page':>14} {'share':>7}")
    for r in rows:
        click.echo(f"{r['rank']:>4} {r['pid']:>7} {r['start']:>#18x} {r['end']:>#18x} "
                   f"{_size(r['bytes']):>11} {r['weight_per_page']:>14.1f} "
                   f"{100 * r['share']:>6.1f}%")
