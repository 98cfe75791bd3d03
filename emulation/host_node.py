"""On a host that really has several NUMA nodes: designate one node as the emulated CXL tier.

`designate(node, offline_cpus)` checks the node exists, has memory, and is not the only node
with CPUs, optionally takes its CPUs offline (so it is CPU-less like CXL memory) and returns
the state to save; `restore(state)` brings those CPUs back online. All sysfs access goes
through tiermem.kfs.
"""
from __future__ import annotations

from tiermem import kfs
from tiermem.errors import TiermemError

NODE_DIR = "/sys/devices/system/node"


def online_nodes() -> list[int]:
    return kfs.parse_cpulist(kfs.read(f"{NODE_DIR}/online", "0"))


def node_cpus(node: int) -> list[int]:
    return kfs.parse_cpulist(kfs.read(f"{NODE_DIR}/node{node}/cpulist", ""))


def check_node(node: int) -> None:
    """Raises TiermemError unless node can serve as the emulated CXL tier on this host."""
    nodes = online_nodes()
    if node not in nodes:
        raise TiermemError(f"NUMA node {node} does not exist on this host (online nodes: "
                           f"{kfs.read(f'{NODE_DIR}/online', '0')}); use the QEMU machine "
                           f"instead (tiermem emulate start without --node)")
    if len(nodes) < 2:
        raise TiermemError(f"this host has only NUMA node {node}: it cannot be both the "
                           f"fast and the slow tier")
    with_memory = kfs.parse_cpulist(kfs.read(f"{NODE_DIR}/has_memory", ""))
    if node not in with_memory:
        raise TiermemError(f"NUMA node {node} has no memory")
    others_with_cpus = [n for n in nodes if n != node and node_cpus(n)]
    if not others_with_cpus:
        raise TiermemError(f"NUMA node {node} holds every CPU: another node must keep CPUs")


def designate(node: int, offline_cpus: bool, log=print) -> dict:
    """Makes node the CXL tier; returns the state (node, CPUs taken offline) to keep."""
    check_node(node)
    offlined: list[int] = []
    if offline_cpus:
        cpus = node_cpus(node)
        for c in cpus:
            if not kfs.exists(f"/sys/devices/system/cpu/cpu{c}/online"):
                raise TiermemError(f"CPU {c} of node {node} cannot be taken offline "
                                   f"(no /sys/devices/system/cpu/cpu{c}/online)")
        try:
            for c in cpus:
                if kfs.read(f"/sys/devices/system/cpu/cpu{c}/online") == "1":
                    kfs.write(f"/sys/devices/system/cpu/cpu{c}/online", 0)
                    offlined.append(c)
        except TiermemError:
            restore({"offlined_cpus": offlined})
            raise
        log(f"node {node}: CPUs {','.join(map(str, offlined)) or '(none)'} taken offline")
    log(f"node {node} is the emulated CXL tier")
    return {"mode": "host", "node": node, "offlined_cpus": offlined}


def restore(state: dict, log=print) -> None:
    """Brings back online the CPUs `designate` took offline."""
    failed = []
    for c in state.get("offlined_cpus", []):
        try:
            kfs.write(f"/sys/devices/system/cpu/cpu{c}/online", 1)
        except TiermemError:
            failed.append(c)
    if failed:
        raise TiermemError(f"could not bring CPUs {failed} back online")
    if state.get("offlined_cpus"):
        log(f"CPUs {','.join(map(str, state['offlined_cpus']))} back online")
