"""The emulated CXL machine's shape (CPUs, node sizes, SLIT distances, HMAT latencies and
bandwidths) and the QEMU command line that builds it.

Node 0 has all the vCPUs and the fast memory (DDR5-like by default: 100 ns, 40 GB/s).
Nodes 1..N are CPU-less memory nodes (CXL-like by default: 280 ns, 16 GB/s) whose HMAT
entries make the guest kernel put them in a lower memory tier.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from tiermem.errors import TiermemError


@dataclass
class MachineConfig:
    cpus: int = 2
    fast_mem_mib: int = 2048
    slow_nodes: int = 1
    slow_mem_mib: int = 2048
    fast_latency_ns: int = 100
    slow_latency_ns: int = 280
    fast_bandwidth_gbs: float = 40.0
    slow_bandwidth_gbs: float = 16.0
    slow_distance: int | None = None   # SLIT node 0 <-> slow node; None: 10 * latency ratio

    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise TiermemError(f"emulated machine: {msg}")
        need(1 <= self.cpus <= 64, f"cpus must be 1..64, got {self.cpus}")
        need(self.fast_mem_mib >= 256, f"fast node memory must be >= 256 MiB, got {self.fast_mem_mib} MiB")
        need(1 <= self.slow_nodes <= 8, f"slow nodes must be 1..8, got {self.slow_nodes}")
        need(self.slow_mem_mib >= 64, f"slow node memory must be >= 64 MiB, got {self.slow_mem_mib} MiB")
        need(0 < self.fast_latency_ns < self.slow_latency_ns <= 100000,
             f"latencies must satisfy 0 < fast ({self.fast_latency_ns} ns) < slow "
             f"({self.slow_latency_ns} ns) <= 100000 ns")
        need(0 < self.slow_bandwidth_gbs <= self.fast_bandwidth_gbs <= 10000,
             f"bandwidths must satisfy 0 < slow ({self.slow_bandwidth_gbs} GB/s) <= fast "
             f"({self.fast_bandwidth_gbs} GB/s)")
        d = self.distance()
        need(10 < d <= 254, f"SLIT distance must be 11..254, got {d}")

    def distance(self) -> int:
        if self.slow_distance is not None:
            return self.slow_distance
        return min(254, max(11, round(10 * self.slow_latency_ns / self.fast_latency_ns)))

    @property
    def total_mem_mib(self) -> int:
        return self.fast_mem_mib + self.slow_nodes * self.slow_mem_mib

    def as_dict(self) -> dict:
        d = asdict(self)
        d["slow_distance"] = self.distance()
        return d

    def numa_args(self) -> list[str]:
        """-object/-numa arguments: memory backends, nodes, SLIT and HMAT."""
        a = ["-object", f"memory-backend-ram,id=m0,size={self.fast_mem_mib}M",
             "-numa", f"node,nodeid=0,cpus=0-{self.cpus - 1},memdev=m0"]
        nodes = range(1, self.slow_nodes + 1)
        for n in nodes:
            a += ["-object", f"memory-backend-ram,id=m{n},size={self.slow_mem_mib}M",
                  "-numa", f"node,nodeid={n},memdev=m{n},initiator=0"]
        dist = self.distance()
        for n in nodes:
            a += ["-numa", f"dist,src=0,dst={n},val={dist}"]
            for m in nodes:
                if m > n:
                    a += ["-numa", f"dist,src={n},dst={m},val={min(254, dist + 10)}"]
        for n in range(0, self.slow_nodes + 1):
            lat = self.fast_latency_ns if n == 0 else self.slow_latency_ns
            bw = self.fast_bandwidth_gbs if n == 0 else self.slow_bandwidth_gbs
            a += ["-numa", f"hmat-lb,initiator=0,target={n},hierarchy=memory,"
                           f"data-type=access-latency,latency={lat}",
                  "-numa", f"hmat-lb,initiator=0,target={n},hierarchy=memory,"
                           f"data-type=access-bandwidth,bandwidth={round(bw * 1000)}M"]
        return a


_PATH_OK = re.compile(r"^/[A-Za-z0-9._/+-]*$")


def check_guest_path(p: str, what: str) -> None:
    """Paths go on the kernel command line: absolute, no spaces or shell characters."""
    if not _PATH_OK.match(p):
        raise TiermemError(f"{what} {p!r}: must be an absolute path of letters, digits and "
                           f"._/+- only (it is passed on the guest kernel command line)")
