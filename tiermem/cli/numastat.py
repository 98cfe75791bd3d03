"""`tiermem numastat PID`: where a process's pages are, per node and per mapping."""
from __future__ import annotations

import click

from tiermem.cli.common import echo_json, pages_mib
from tiermem.placement import PAGE, numastat, totals


@click.command("numastat")
@click.argument("pid", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--vmas/--no-vmas", default=True, show_default=True, help="Show per-VMA rows.")
def command(pid, as_json, vmas):
    """Show where PID's resident pages are, per NUMA node and per mapping."""
    rows = numastat(pid)
    nodes = sorted({n for r in rows for n in r.pages_per_node})
    tot = totals(rows)
    if as_json:
        echo_json({
            "pid": pid, "page_size": PAGE,
            "nodes": {str(n): sum(r.pages_per_node.get(n, 0) for r in rows) for n in nodes},
            "by_kind": {k: {str(n): c for n, c in v.items()} for k, v in tot.items()},
            "vmas": [{"start": hex(r.vma.start), "end": hex(r.vma.end), "perms": r.vma.perms,
                      "path": r.vma.label(), "kind": r.vma.kind,
                      "pages": {str(n): c for n, c in r.pages_per_node.items()},
                      "not_on_a_node": r.other} for r in rows],
        })
        return
    hdr = "".join(f"{'node ' + str(n):>14}" for n in nodes)
    click.echo(f"PID {pid}: resident pages per node (MiB)")
    click.echo(f"{'':<40}{hdr}{'total':>14}")
    for kind in sorted(tot):
        c = tot[kind]
        click.echo(f"{kind:<40}" + "".join(f"{pages_mib(c.get(n, 0)):>14}" for n in nodes)
                   + f"{pages_mib(sum(c.values())):>14}")
    allc = {n: sum(r.pages_per_node.get(n, 0) for r in rows) for n in nodes}
    click.echo(f"{'total':<40}" + "".join(f"{pages_mib(allc[n]):>14}" for n in nodes)
               + f"{pages_mib(sum(allc.values())):>14}")
    if vmas:
        click.echo("")
        click.echo(f"{'mapping':<40}{hdr}")
        for r in rows:
            name = f"{r.vma.start:x}-{r.vma.end:x} {r.vma.perms} {r.vma.label()}"
            if len(name) > 39:
                name = name[:36] + "..."
            click.echo(f"{name:<40}" + "".join(
                f"{pages_mib(r.pages_per_node.get(n, 0)):>14}" for n in nodes))
