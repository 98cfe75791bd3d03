"""`tiermem move PID --to NODE`: move a process's resident pages to a node, by range and
with a size cap, reporting pages moved, failures by errno and MB/s."""
from __future__ import annotations

import sys

import click

from tiermem.cli.common import echo_json, pages_mib, progress_done, progress_line
from tiermem.errors import TiermemError
from tiermem.placement import move, parse_range


@click.command("move")
@click.argument("pid", type=int)
@click.option("--to", "to_node", type=int, required=True, help="Target NUMA node.")
@click.option("--range", "rng", metavar="START-END", help="Only pages in this address range.")
@click.option("--max-mb", type=float, help="Move at most this many MB.")
@click.option("--batch", type=click.IntRange(1, 1 << 20), default=4096, show_default=True,
              help="Pages per move_pages call.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def command(pid, to_node, rng, max_mb, batch, as_json):
    """Move PID's resident pages to node --to."""
    r = move(pid, to_node, parse_range(rng) if rng else None, max_mb, batch,
             progress=None if as_json else
             lambda d, t: progress_line(f"moving: {d}/{t} pages"))
    progress_done()
    if as_json:
        echo_json(r.to_dict())
    else:
        click.echo(f"PID {pid} -> node {to_node}: moved {r.moved} pages "
                   f"({pages_mib(r.moved)}) in {r.seconds * 1e3:.1f} ms, "
                   f"{r.mb_per_s:.0f} MB/s; {r.already} pages already on node {to_node}")
        for name, n in sorted(r.failed.items()):
            click.echo(f"  failed: {n} pages with {name}")
    if r.failed:
        n = sum(r.failed.values())
        why = ", ".join(f"{k} x{v}" for k, v in sorted(r.failed.items()))
        hint = " (target node is full)" if "ENOMEM" in r.failed else ""
        click.echo(f"tiermem: error: {n} of {r.requested} pages were not moved: {why}{hint}",
                   err=True)
        sys.exit(2)
