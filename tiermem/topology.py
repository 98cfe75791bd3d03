"""The host's memory topology: NUMA nodes, distances, memory tiers, demotion, HMAT classes.

Everything comes from sysfs/procfs through tiermem.kfs; `fast_nodes`/`slow_nodes` is the
answer the rest of tiermem uses to know where the fast (DRAM) and slow (CXL) tiers are.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from tiermem import kfs
from tiermem.errors import TiermemError

NODE_DIR = "/sys/devices/system/node"
TIER_DIR = "/sys/devices/virtual/memory_tiering"
# The kernel's abstract-distance chunk per tier (mm/memory-tiers.c: MEMTIER_CHUNK_BITS = 7,
# and sysfs names a tier by its abstract distance >> 7). Lower tier id = faster memory.
HMAT_ATTRS = ("read_latency", "write_latency", "read_bandwidth", "write_bandwidth")


@dataclass
class Node:
    id: int
    cpus: list[int]
    mem_total_kb: int
    mem_free_kb: int
    distances: dict[int, int]
    tier: int | None = None            # memory tier id (lower = faster), None if no tiering
    hmat: dict[str, dict[str, int]] = field(default_factory=dict)  # access0/1 -> attrs
    demotion_targets: list[int] = field(default_factory=list)

    @property
    def cpuless(self) -> bool:
        return not self.cpus

    @property
    def has_memory(self) -> bool:
        return self.mem_total_kb > 0


@dataclass
class Topology:
    nodes: dict[int, Node]
    tiers: dict[int, list[int]]        # tier id -> node ids
    demotion_enabled: bool | None
    numa_balancing: int | None
    kernel: str

    @property
    def memory_nodes(self) -> list[int]:
        return [n.id for n in self.nodes.values() if n.has_memory]

    @property
    def fast_nodes(self) -> list[int]:
        """Nodes of the top memory tier; without tier info, memory nodes that have CPUs."""
        if len(self.tiers) > 1:
            return sorted(self.tiers[min(self.tiers)])
        with_cpu = [n.id for n in self.nodes.values() if n.has_memory and not n.cpuless]
        return with_cpu or self.memory_nodes

    @property
    def slow_nodes(self) -> list[int]:
        """Nodes below the top tier (CXL-like); without tier info, CPU-less memory nodes."""
        if len(self.tiers) > 1:
            top = min(self.tiers)
            return sorted(n for t, ns in self.tiers.items() if t != top for n in ns)
        return [n.id for n in self.nodes.values() if n.has_memory and n.cpuless]

    def node(self, nid: int) -> Node:
        if nid not in self.nodes:
            raise TiermemError(f"node {nid} does not exist (nodes: "
                               f"{', '.join(map(str, sorted(self.nodes)))})")
        return self.nodes[nid]

    def to_dict(self) -> dict:
        d = {
            "kernel": self.kernel,
            "nodes": [dict(asdict(n), cpuless=n.cpuless) for n in self.nodes.values()],
            "tiers": {str(t): ns for t, ns in sorted(self.tiers.items())},
            "demotion_enabled": self.demotion_enabled,
            "numa_balancing": self.numa_balancing,
            "fast_nodes": self.fast_nodes,
            "slow_nodes": self.slow_nodes,
        }
        for n in d["nodes"]:
            n["distances"] = {str(k): v for k, v in n["distances"].items()}
        return d


def _meminfo_kb(nid: int) -> tuple[int, int]:
    text = kfs.read(f"{NODE_DIR}/node{nid}/meminfo", "")
    vals = dict(re.findall(r"Node \d+ (\w+):\s+(\d+) kB", text))
    return int(vals.get("MemTotal", 0)), int(vals.get("MemFree", 0))


def zone_watermarks(nid: int, zoneinfo: str | None = None) -> dict[str, int]:
    """The kernel's free-memory watermarks of node nid, in bytes, summed over its zones
    (/proc/zoneinfo): min, low, high and promo (the level NUMA-balancing promotion keeps
    free, Linux 6.1+; absent before). Empty where /proc/zoneinfo has no such node."""
    text = kfs.read("/proc/zoneinfo", "") if zoneinfo is None else zoneinfo
    out: dict[str, int] = {}
    node = None
    for line in text.splitlines():
        m = re.match(r"Node (\d+), zone", line)
        if m:
            node = int(m.group(1))
            continue
        m = re.match(r"\s+(min|low|high|promo)\s+(\d+)$", line)
        if m and node == nid:
            out[m.group(1)] = out.get(m.group(1), 0) + int(m.group(2)) * 4096
    return out


def _hmat(nid: int) -> dict[str, dict[str, int]]:
    out = {}
    for acc in ("access0", "access1"):
        base = f"{NODE_DIR}/node{nid}/{acc}/initiators"
        if not kfs.exists(base):
            continue
        attrs = {a: kfs.read_int(f"{base}/{a}", -1) for a in HMAT_ATTRS}
        attrs = {a: v for a, v in attrs.items() if v >= 0}
        initiators = [e[4:] for e in kfs.listdir(base) if re.fullmatch(r"node\d+", e)]
        if attrs or initiators:
            out[acc] = dict(attrs, initiators=[int(i) for i in initiators])
    return out


def _tiers() -> dict[int, list[int]]:
    tiers = {}
    for entry in kfs.listdir(TIER_DIR):
        m = re.fullmatch(r"memory_tier(\d+)", entry)
        if m:
            nodes = kfs.parse_cpulist(kfs.read(f"{TIER_DIR}/{entry}/nodelist", ""))
            if nodes:
                tiers[int(m.group(1))] = nodes
    return tiers


def _demotion_targets(tiers: dict[int, list[int]], nodes: dict[int, Node]) -> None:
    """The kernel does not export demotion targets; derive them as it does: a node demotes
    to the nearest nodes (by SLIT distance) of the next lower tier."""
    order = sorted(tiers)
    for i, t in enumerate(order[:-1]):
        lower = tiers[order[i + 1]]
        for nid in tiers[t]:
            if nid not in nodes:
                continue
            dist = nodes[nid].distances
            best = min((dist.get(x, 255) for x in lower), default=None)
            nodes[nid].demotion_targets = sorted(x for x in lower if dist.get(x, 255) == best)


def read_topology() -> Topology:
    """Read the running kernel's topology (works on any Linux; one node if !CONFIG_NUMA)."""
    import platform
    ids = kfs.parse_cpulist(kfs.read(f"{NODE_DIR}/online", "0"))
    nodes: dict[int, Node] = {}
    for nid in ids:
        cpus = kfs.parse_cpulist(kfs.read(f"{NODE_DIR}/node{nid}/cpulist", ""))
        total, free = _meminfo_kb(nid)
        dist_row = [int(x) for x in kfs.read(f"{NODE_DIR}/node{nid}/distance", "10").split()]
        distances = {other: d for other, d in zip(ids, dist_row)}
        nodes[nid] = Node(nid, cpus, total, free, distances, hmat=_hmat(nid))
    tiers = _tiers()
    for t, ns in tiers.items():
        for nid in ns:
            if nid in nodes:
                nodes[nid].tier = t
    _demotion_targets(tiers, nodes)
    demo = kfs.read("/sys/kernel/mm/numa/demotion_enabled", "")
    return Topology(
        nodes=nodes,
        tiers=tiers,
        demotion_enabled=(demo in ("true", "1")) if demo else None,
        numa_balancing=kfs.read_int("/proc/sys/kernel/numa_balancing", -1)
        if kfs.exists("/proc/sys/kernel/numa_balancing") else None,
        kernel=platform.release(),
    )


def slow_node_or_fallback(topo: Topology | None = None) -> tuple[int, str | None]:
    """The node to use as the CXL tier, and a warning when the host has none (then node 0)."""
    topo = topo or read_topology()
    if topo.slow_nodes:
        return topo.slow_nodes[0], None
    fb = topo.memory_nodes[0] if topo.memory_nodes else 0
    return fb, (f"this host has no slow memory tier (one NUMA node or no CPU-less node); "
                f"using node {fb} as the CXL tier")
