"""Access samplers: one module per kernel signal behind the interface in tiermem.samplers.base.

REGISTRY maps a sampler's name to its class; availability() says, per sampler, whether it
can run on this kernel and if not exactly why.
"""
from __future__ import annotations

from tiermem.samplers.base import Sampler, Spans, Target
from tiermem.samplers.damon import DamonSampler
from tiermem.samplers.ebpf import FaultSampler, MemSampler
from tiermem.samplers.idle import IdleSampler
from tiermem.samplers.pagemap import PagemapSampler
from tiermem.samplers.trace import TraceSampler

REGISTRY: dict[str, type[Sampler]] = {
    "damon": DamonSampler,
    "ebpf": FaultSampler,
    "ebpf-mem": MemSampler,
    "idle": IdleSampler,
    "pagemap": PagemapSampler,
    "trace": TraceSampler,
}


def availability() -> dict[str, tuple[bool, str]]:
    return {name: cls.available() for name, cls in REGISTRY.items()}


__all__ = ["REGISTRY", "Sampler", "Spans", "Target", "availability"]
