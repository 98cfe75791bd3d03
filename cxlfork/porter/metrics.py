"""Prometheus metrics of the porter (its own registry, served at GET /metrics).

    porter_invocations_total{function,start}     start = cold | warm | restored
    porter_invocation_seconds{function,start}    histogram
    porter_latency_seconds{function,quantile}    p50 / p99 over the recent window
    porter_errors_total{function,kind}           function_error | crash | timeout | ...
    porter_instances{function}
    porter_local_memory_bytes{function}          anonymous memory of its instances
    porter_shared_memory_bytes{function}         resident page-store pages they map
    porter_store_bytes{function}                 size of its checkpoint's page file
    porter_policy{function,policy}               1 for the clone policy in use, else 0
    porter_policy_switches_total{function,to}
    porter_checkpoints_total{function}
    porter_local_memory_pressure                 cgroup working set / limit (0: no limit)
    porter_cgroup_memory_bytes{function,kind}    the function's memory cgroup: usage,
                                                 working_set, anon, file (with a limit)
    porter_oom_kills{function}                   instances the kernel OOM-killed
    porter_ghosts{function,state}                ghost pool: idle (gauge)
    porter_ghosts_events{function,event}         spawned | taken | fallbacks | dead
                                                 (totals so far)
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
POLICY_NAMES = ("cold", "mow", "hybrid", "moa", "moa-eager")


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.invocations = Counter("porter_invocations", "Invocations by start kind",
                                   ["function", "start"], registry=r)
        self.seconds = Histogram("porter_invocation_seconds", "Invocation latency",
                                 ["function", "start"], buckets=BUCKETS, registry=r)
        self.latency = Gauge("porter_latency_seconds", "Recent latency quantiles",
                             ["function", "quantile"], registry=r)
        self.errors = Counter("porter_errors", "Failed invocations and starts",
                              ["function", "kind"], registry=r)
        self.instances = Gauge("porter_instances", "Running instances", ["function"],
                               registry=r)
        self.local = Gauge("porter_local_memory_bytes", "Anonymous (local) memory of the "
                           "function's instances", ["function"], registry=r)
        self.shared = Gauge("porter_shared_memory_bytes", "Resident page-store pages the "
                            "instances map", ["function"], registry=r)
        self.store = Gauge("porter_store_bytes", "Checkpoint page file size", ["function"],
                           registry=r)
        self.policy = Gauge("porter_policy", "Clone policy in use (1) per function",
                            ["function", "policy"], registry=r)
        self.switches = Counter("porter_policy_switches", "Clone policy changes",
                                ["function", "to"], registry=r)
        self.checkpoints = Counter("porter_checkpoints", "Checkpoints taken", ["function"],
                                   registry=r)
        self.pressure = Gauge("porter_local_memory_pressure", "Local memory / limit",
                              registry=r)
        self.cgroup = Gauge("porter_cgroup_memory_bytes", "The function's memory cgroup",
                            ["function", "kind"], registry=r)
        self.oom_kills = Gauge("porter_oom_kills", "Instances OOM-killed by the kernel",
                               ["function"], registry=r)
        self.ghosts = Gauge("porter_ghosts", "Idle ghosts (pre-spawned restorers)",
                            ["function", "state"], registry=r)
        self.ghost_events = Gauge("porter_ghosts_events", "Ghost pool events so far",
                                  ["function", "event"], registry=r)

    def observe(self, fn: str, start: str, ms: float) -> None:
        self.invocations.labels(fn, start).inc()
        self.seconds.labels(fn, start).observe(ms / 1e3)

    def set_policy(self, fn: str, policy: str) -> None:
        for p in POLICY_NAMES:
            self.policy.labels(fn, p).set(1 if p == policy else 0)

    def update(self, fn: str, st: dict, store_bytes: int, cgroup: dict | None) -> None:
        """Gauges from one function's stats() document and its cgroup's usage."""
        if cgroup:
            for k in ("usage", "working_set", "anon", "file"):
                self.cgroup.labels(fn, k).set(cgroup[f"{k}_bytes"])
            self.oom_kills.labels(fn).set(cgroup["oom_kills"])
        if st.get("ghosts"):
            self.ghosts.labels(fn, "idle").set(st["ghosts"]["idle"])
            for k in ("spawned", "taken", "fallbacks", "dead"):
                if k in st["ghosts"]:
                    self.ghost_events.labels(fn, k).set(st["ghosts"][k])
        self.instances.labels(fn).set(st["instances"])
        self.local.labels(fn).set(st["memory"]["local_bytes"])
        self.shared.labels(fn).set(st["memory"]["shared_bytes"])
        self.store.labels(fn).set(store_bytes)
        for q in ("p50", "p99"):
            v = st["latency_ms"]["all"][q]
            if v is not None:
                self.latency.labels(fn, q).set(v / 1e3)
        self.set_policy(fn, st["policy"])

    def text(self) -> bytes:
        return generate_latest(self.registry)
