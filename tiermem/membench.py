"""Latency and bandwidth matrix, like Intel MLC: from each CPU node to each memory node.

The work is done in C (tiermem.native): pointer chasing over a random cycle of cache lines
for idle latency, a streaming read for bandwidth, on memory bound to the target node.
"""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

from tiermem import native
from tiermem.errors import TiermemError
from tiermem.topology import Topology


@dataclass
class Cell:
    cpu_node: int
    mem_node: int
    latency_ns: float
    bandwidth_gbs: float


def measure_cell(cpu_node_cpus: list[int], mem_node: int, size_mb: int = 128,
                 repeats: int = 3) -> tuple[float, float]:
    """(median latency ns, median read GB/s) running on the given CPUs against mem_node."""
    old = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, cpu_node_cpus[:1])
        try:
            buf = native.NodeBuffer(size_mb << 20, mem_node)
        except OSError as e:
            raise TiermemError(f"cannot allocate {size_mb} MiB on node {mem_node}: "
                               f"{e.strerror}") from e
        with buf:
            loads = max(200_000, (size_mb << 20) // 64)
            lat = [native.latency_ns(buf, loads=loads, seed=i + 1) for i in range(repeats)]
            bw = [native.read_bandwidth(buf, passes=2) / 1e9 for _ in range(repeats)]
    finally:
        os.sched_setaffinity(0, old)
    return statistics.median(lat), statistics.median(bw)


def measure_matrix(topo: Topology, size_mb: int = 128, repeats: int = 3,
                   progress=None) -> list[Cell]:
    cpu_nodes = [n for n in topo.nodes.values() if n.cpus]
    mem_nodes = [n for n in topo.nodes.values() if n.has_memory]
    cells = []
    for cn in cpu_nodes:
        for mn in mem_nodes:
            if progress:
                progress(f"measuring CPU node {cn.id} -> memory node {mn.id}")
            lat, bw = measure_cell(cn.cpus, mn.id, size_mb, repeats)
            cells.append(Cell(cn.id, mn.id, lat, bw))
    return cells
