"""`tiermem topo`: NUMA nodes, distances, memory tiers, demotion, HMAT; --measure for the
latency / bandwidth matrix."""
from __future__ import annotations

import click

from tiermem.cli.common import echo_json, mib, progress_done, progress_line
from tiermem.topology import read_topology


@click.command("topo")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--measure", is_flag=True,
              help="Measure idle latency (ns) and read bandwidth (GB/s) from each CPU node "
                   "to each memory node.")
@click.option("--size-mb", default=128, show_default=True, type=click.IntRange(8, 65536),
              help="Buffer size per measurement (larger than the LLC).")
def command(as_json, measure, size_mb):
    """Show the host's memory topology."""
    topo = read_topology()
    cells = []
    if measure:
        from tiermem.membench import measure_matrix
        cells = measure_matrix(topo, size_mb=size_mb,
                               progress=None if as_json else progress_line)
        progress_done()
    if as_json:
        d = topo.to_dict()
        if measure:
            d["measured"] = [{"cpu_node": c.cpu_node, "mem_node": c.mem_node,
                              "latency_ns": round(c.latency_ns, 1),
                              "bandwidth_gbs": round(c.bandwidth_gbs, 2)} for c in cells]
        echo_json(d)
        return
    click.echo(f"kernel {topo.kernel}; {len(topo.nodes)} NUMA node(s); "
               f"demotion_enabled={topo.demotion_enabled}; numa_balancing={topo.numa_balancing}")
    click.echo(f"{'node':>4}  {'cpus':<12} {'memory':>12} {'free':>12}  {'tier':>4}  "
               f"{'kind':<9} demotes to")
    for n in topo.nodes.values():
        cpus = _cpulist(n.cpus) or "-"
        kind = "cpu-less" if n.cpuless else "cpu"
        click.echo(f"{n.id:>4}  {cpus:<12} {mib(n.mem_total_kb):>12} {mib(n.mem_free_kb):>12}  "
                   f"{'-' if n.tier is None else n.tier:>4}  {kind:<9} "
                   f"{','.join(map(str, n.demotion_targets)) or '-'}")
    ids = sorted(topo.nodes)
    click.echo("distances (SLIT):")
    click.echo("      " + "".join(f"{i:>6}" for i in ids))
    for i in ids:
        click.echo(f"{i:>6}" + "".join(f"{topo.nodes[i].distances.get(j, 0):>6}" for j in ids))
    hm = [(n.id, acc, a) for n in topo.nodes.values() for acc, a in n.hmat.items()]
    if hm:
        click.echo("HMAT access classes:")
        for nid, acc, a in hm:
            click.echo(f"  node {nid} {acc}: read {a.get('read_latency', '?')} ns, "
                       f"write {a.get('write_latency', '?')} ns, "
                       f"read {a.get('read_bandwidth', '?')} MB/s, "
                       f"write {a.get('write_bandwidth', '?')} MB/s, "
                       f"initiators {a.get('initiators', [])}")
    click.echo(f"fast tier nodes: {topo.fast_nodes}; slow tier nodes: {topo.slow_nodes or 'none'}")
    if measure:
        click.echo(f"measured ({size_mb} MiB buffers, median of 3):")
        mem = sorted({c.mem_node for c in cells})
        click.echo(f"{'cpu node':>8} " + "".join(f"{'node ' + str(m):>24}" for m in mem))
        for cn in sorted({c.cpu_node for c in cells}):
            row = {c.mem_node: c for c in cells if c.cpu_node == cn}
            click.echo(f"{cn:>8} " + "".join(
                f"{row[m].latency_ns:>10.1f} ns {row[m].bandwidth_gbs:>7.2f} GB/s" for m in mem))


def _cpulist(cpus: list[int]) -> str:
    if not cpus:
        return ""
    out, start, prev = [], cpus[0], cpus[0]
    for c in cpus[1:] + [None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if c is not None:
            start = prev = c
    return ",".join(out)
