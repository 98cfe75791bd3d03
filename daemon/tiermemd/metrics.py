"""tiermemd's counters: one Stats object the loop updates, shown by `tiermem ctl stats` and
exported in Prometheus text format on a loopback HTTP endpoint (prometheus-client).

Exported series (labels in braces):
  tiermemd_pages_promoted_total{target}           pages moved slow -> fast
  tiermemd_pages_demoted_total{target}            pages moved fast -> slow
  tiermemd_migration_failures_total{target,errno} pages move_pages left in place
  tiermemd_migration_bytes_per_second             bytes moved per second, last loop
  tiermemd_fast_tier_share{target}                present pages on the fast tier (0..1)
  tiermemd_fast_tier_access_share{target}         sampled accesses that hit the fast tier
  tiermemd_sampler_cpu_seconds_total{target}      CPU spent by the target's sampler
  tiermemd_cpu_seconds_total                      CPU spent by the daemon process
  tiermemd_loop_lag_seconds                       how late the last loop started
  tiermemd_loop_seconds                           how long the last loop ran
  tiermemd_target_processes{target}               processes the target covers now
  tiermemd_processes_exited_total{target}         processes that exited while tiered
  tiermemd_node_full_events_total{target}         moves stopped by a full node (ENOMEM)
  tiermemd_pages_refused_total{target}            pages the kernel would not migrate
                                                  (EBUSY, EACCES, EAGAIN, EIO, ...)
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tiermem.errors import TiermemError


class TargetStats:
    def __init__(self):
        self.promoted = 0
        self.demoted = 0
        self.failures: dict[str, int] = defaultdict(int)
        self.fast_pages = 0
        self.slow_pages = 0
        self.fast_access_share: float | None = None
        self.sampler_cpu_s = 0.0
        self.processes = 0
        self.planned_promote = 0   # dry run: pages a real run would have promoted
        self.planned_demote = 0
        self.errors = 0            # policy/sampler errors logged
        self.last_error = ""
        self.processes_exited = 0  # processes that exited (or exec'd) while tiered
        self.node_full = 0         # moves that stopped because the target node was full

    @property
    def refused(self) -> int:
        """Pages the kernel would not migrate (busy, pinned, shared, I/O): every failure but
        a full node (ENOMEM) and a page that is gone (EFAULT, ENOENT)."""
        return sum(v for k, v in self.failures.items() if k not in ("ENOMEM", "EFAULT",
                                                                      "ENOENT"))

    @property
    def fast_share(self) -> float | None:
        tot = self.fast_pages + self.slow_pages
        return self.fast_pages / tot if tot else None

    def to_dict(self) -> dict:
        return {"pages_promoted": self.promoted, "pages_demoted": self.demoted,
                "failures_by_errno": dict(self.failures), "fast_pages": self.fast_pages,
                "slow_pages": self.slow_pages,
                "fast_tier_share": None if self.fast_share is None else round(self.fast_share, 4),
                "fast_tier_access_share": None if self.fast_access_share is None
                else round(self.fast_access_share, 4),
                "sampler_cpu_seconds": round(self.sampler_cpu_s, 4),
                "planned_promote": self.planned_promote,
                "planned_demote": self.planned_demote,
                "processes": self.processes, "errors": self.errors,
                "processes_exited": self.processes_exited,
                "node_full_events": self.node_full,
                "pages_busy": self.failures.get("EBUSY", 0),
                "pages_refused": self.refused,
                "last_error": self.last_error}


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.targets: dict[str, TargetStats] = defaultdict(TargetStats)
        self.started = time.monotonic()
        self.loops = 0
        self.mb_per_s = 0.0
        self.loop_lag_s = 0.0
        self.loop_s = 0.0
        self.bytes_moved = 0

    def daemon_cpu_s(self) -> float:
        return time.process_time()

    def to_dict(self) -> dict:
        with self.lock:
            up = time.monotonic() - self.started
            cpu = self.daemon_cpu_s()
            return {"uptime_seconds": round(up, 3), "loops": self.loops,
                    "daemon_cpu_seconds": round(cpu, 4),
                    "daemon_cpu_percent_of_core": round(100 * cpu / up, 3) if up else 0.0,
                    "migration_mb_per_s": round(self.mb_per_s, 3),
                    "bytes_moved": self.bytes_moved,
                    "loop_lag_seconds": round(self.loop_lag_s, 4),
                    "loop_seconds": round(self.loop_s, 4),
                    "targets": {k: v.to_dict() for k, v in self.targets.items()}}


class _Collector:
    def __init__(self, stats: Stats):
        self.stats = stats

    def collect(self):
        s = self.stats
        prom = CounterMetricFamily("tiermemd_pages_promoted", "Pages moved slow -> fast",
                                   labels=["target"])
        dem = CounterMetricFamily("tiermemd_pages_demoted", "Pages moved fast -> slow",
                                  labels=["target"])
        fail = CounterMetricFamily("tiermemd_migration_failures",
                                   "Pages move_pages left in place, by errno",
                                   labels=["target", "errno"])
        share = GaugeMetricFamily("tiermemd_fast_tier_share",
                                  "Share of present pages on the fast tier", labels=["target"])
        ashare = GaugeMetricFamily("tiermemd_fast_tier_access_share",
                                   "Share of sampled accesses on the fast tier",
                                   labels=["target"])
        scpu = CounterMetricFamily("tiermemd_sampler_cpu_seconds",
                                   "CPU seconds spent by the target's sampler",
                                   labels=["target"])
        procs = GaugeMetricFamily("tiermemd_target_processes", "Processes the target covers",
                                  labels=["target"])
        exited = CounterMetricFamily("tiermemd_processes_exited",
                                     "Processes that exited while tiered", labels=["target"])
        full = CounterMetricFamily("tiermemd_node_full_events",
                                   "Moves stopped because the target node was full (ENOMEM)",
                                   labels=["target"])
        refused = CounterMetricFamily("tiermemd_pages_refused",
                                      "Pages the kernel would not migrate (EBUSY, EACCES, ...)",
                                      labels=["target"])
        with s.lock:
            for name, t in s.targets.items():
                exited.add_metric([name], t.processes_exited)
                full.add_metric([name], t.node_full)
                refused.add_metric([name], t.refused)
                prom.add_metric([name], t.promoted)
                dem.add_metric([name], t.demoted)
                for e, n in t.failures.items():
                    fail.add_metric([name, e], n)
                if t.fast_share is not None:
                    share.add_metric([name], t.fast_share)
                if t.fast_access_share is not None:
                    ashare.add_metric([name], t.fast_access_share)
                scpu.add_metric([name], t.sampler_cpu_s)
                procs.add_metric([name], t.processes)
            rate = GaugeMetricFamily("tiermemd_migration_bytes_per_second",
                                     "Bytes moved per second in the last loop",
                                     value=s.mb_per_s * 1e6)
            lag = GaugeMetricFamily("tiermemd_loop_lag_seconds",
                                    "How late the last loop started", value=s.loop_lag_s)
            dur = GaugeMetricFamily("tiermemd_loop_seconds", "How long the last loop ran",
                                    value=s.loop_s)
        cpu = CounterMetricFamily("tiermemd_cpu_seconds", "CPU seconds used by tiermemd",
                                  value=s.daemon_cpu_s())
        yield from (prom, dem, fail, share, ashare, scpu, procs, exited, full, refused, rate,
                    lag, dur, cpu)


class MetricsServer:
    """The Prometheus endpoint; bind() raises TiermemError naming the address on failure."""

    def __init__(self, stats: Stats, host: str, port: int):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(stats))
        self.host, self.port = host, port
        self._server = self._thread = None

    def start(self) -> None:
        try:
            self._server, self._thread = start_http_server(self.port, self.host,
                                                           registry=self.registry)
        except OSError as e:
            raise TiermemError(f"metrics endpoint {self.host}:{self.port}: cannot listen: "
                               f"{e.strerror}") from None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
