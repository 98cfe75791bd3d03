"""The Porter: function pools, the HTTP server (in a thread) and the housekeeping loop (in
the main thread, which cxlfork's checkpoint needs: it installs signal handlers).

Housekeeping, every TICK_S: take queued checkpoints and hot-page profiles, sample the
instances' memory (smaps_rollup; their store pages once a second), compute the local-memory
pressure, reclaim idle instances past their keep-alive (shorter under pressure), switch auto
clone policies, update the gauges. stop() (SIGTERM/SIGINT, or a caller) kills every
instance, removes the checkpoints and the temporary run directory: nothing is left behind.
"""
from __future__ import annotations

import os
import queue
import shutil
import signal
import tempfile
import threading
import time

from cxlfork.errors import CxlforkError
from cxlfork.porter import policy as policy_mod
from cxlfork.porter.cgroup import MemoryCgroup
from cxlfork.porter.config import ConfigError, FunctionConfig, PorterConfig
from cxlfork.porter.lifeline import Lifeline
from cxlfork.porter.metrics import Metrics
from cxlfork.porter.pool import FunctionPool

TICK_S = 0.25
PRESSURE_SHORT_KEEPALIVE = 0.8


class Porter:
    def __init__(self, cfg: PorterConfig, log=None):
        self.cfg = cfg
        self.log = log or (lambda msg: None)
        self.stopping = False
        self.jobs: queue.Queue = queue.Queue()
        self.metrics = Metrics()
        self.started = time.monotonic()
        self.own_run_dir = not cfg.run_dir
        self.run_dir = cfg.run_dir or tempfile.mkdtemp(prefix="cxlfork-porter-")
        os.makedirs(os.path.join(self.run_dir, "images"), exist_ok=True)
        self._run_lock = None
        if not self.own_run_dir:
            self._claim_run_dir()
        self.store_dir = None
        self.lock = threading.Lock()               # guards self.pools
        self.pools: dict[str, FunctionPool] = {}
        self.limit = int(cfg.local_memory_limit_mib * 2**20)
        self.pressure = 0.0
        self.server = None
        self.server_thread = None
        self._images = 0
        self.cgroup = None
        self.cgroup_stats: dict = {}
        self.lifeline = Lifeline()                 # restored HTTP clones die with the porter
        self.registry = None                       # the pool's image registry ([porter] pool)
        try:
            if cfg.pool:
                from cxlfork.porter.registry import Registry
                self.registry = Registry(self.log)
            if self.limit:
                self.cgroup = MemoryCgroup.create(self.limit, self.log)
            for fc in cfg.functions.values():
                self._lookup(self.add_function(fc))     # later ones: at housekeeping
        except BaseException:
            self.stop()
            raise

    # -- functions -----------------------------------------------------------------------
    def add_function(self, fc: FunctionConfig) -> FunctionPool:
        with self.lock:
            if fc.name in self.pools:
                raise ConfigError(f"function {fc.name} is already registered")
            if self.cgroup is not None:
                self.cgroup.add_function(fc.name)
            pool = self.pools[fc.name] = FunctionPool(fc, self)
        self.metrics.set_policy(fc.name, pool.policy)
        return pool

    def _lookup(self, pool: FunctionPool) -> None:
        """With the pool registry: take the function's checkpoint from the pool (another
        host's or an earlier porter's) when it has none yet."""
        if self.registry is None or pool.cfg.policy == "cold" or self.stopping:
            return
        with pool.cond:
            if pool.image is not None or pool.checkpoint_pending:
                return
        try:
            found = self.registry.lookup(pool.cfg)
        except (CxlforkError, OSError) as e:
            self.log(f"registry lookup of {pool.name}: {e}")
            return
        if found is None:
            return
        image, rec = found
        ref = f"h{rec['host']}/{rec['name']}"
        remote = rec["host"] != self.registry.pool.host
        with pool.cond:
            if pool.image is not None or pool.checkpoint_pending:
                return
            pool.image, pool.pool_image = image, rec
            pool.checkpoint_info = {"bytes": rec["npages"] * 4096, "from_pool": ref,
                                    "remote": remote}
        self.log(f"{pool.name}: restoring from the pool image {ref}"
                 f"{' (another host took it)' if remote else ''}")
        self._prepare(pool)

    def pool(self, name: str) -> FunctionPool | None:
        with self.lock:
            return self.pools.get(name)

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self.pools)

    # -- memory --------------------------------------------------------------------------
    def local_total(self) -> int:
        """Local memory of all instances (smaps, or the cgroup's working set at the last
        tick when larger), and the estimate of those being started. Takes no
        pool lock (a pool calls it holding its own: locking the others here could deadlock
        two pools scaling out at once)."""
        with self.lock:
            pools = list(self.pools.values())
        measured = sum(i.local_bytes for p in pools for i in list(p.instances))
        # the cgroup also charges page tables, kernel memory and page cache: the larger
        measured = max(measured, self.cgroup_stats.get("working_set_bytes", 0))
        return measured + sum(p.reserved_bytes for p in pools)

    def memory_allows(self, extra: int) -> bool:
        return not self.limit or self.local_total() + extra <= self.limit

    def reclaim_idle(self, need: int, exclude: FunctionPool | None = None) -> int:
        """Free local memory by killing idle instances of other functions, least recently
        used pool first, until `need` more bytes fit under the limit."""
        if not self.limit:
            return 0
        with self.lock:
            pools = [p for p in self.pools.values() if p is not exclude]
        pools.sort(key=lambda p: max((i.last_used for i in p.idle), default=0))
        freed = 0
        for p in pools:
            over = self.local_total() + need - self.limit
            if over <= 0:
                break
            freed += p.reclaim(0, time.monotonic(), force=True, need=over)
        return freed

    # -- life cycle ----------------------------------------------------------------------
    def start_server(self) -> tuple[str, int]:
        from cxlfork.porter.server import make_server
        self.server = make_server(self, self.cfg.host, self.cfg.port)
        self.server_thread = threading.Thread(target=self.server.serve_forever,
                                              kwargs={"poll_interval": 0.1},
                                              name="porter-http", daemon=True)
        self.server_thread.start()
        host, port = self.server.server_address[:2]
        return host, port

    def run(self, install_signals: bool = True) -> None:
        """Housekeeping loop until stop is requested (SIGTERM/SIGINT or request_stop)."""
        if install_signals:
            for s in (signal.SIGTERM, signal.SIGINT):
                signal.signal(s, lambda *_: self.request_stop())
        last_policy = 0.0
        while not self.stopping:
            try:
                job = self.jobs.get(timeout=TICK_S)
            except queue.Empty:
                job = None
            if job is not None and not self.stopping:
                self._run_job(job)
            now = time.monotonic()
            self._housekeeping(now, policies=now - last_policy >= 1.0)
            if now - last_policy >= 1.0:
                last_policy = now

    def request_stop(self) -> None:
        self.stopping = True
        try:
            self.jobs.put_nowait(None)
        except queue.Full:
            pass

    def _claim_run_dir(self) -> None:
        """Lock a configured run_dir for this porter, and remove the checkpoints a porter
        that died there (SIGKILL, a crash) left behind, with their page files: only image
        directories this user owns, in an images/ directory nobody else may write."""
        import fcntl
        lock = open(os.path.join(self.run_dir, "porter.lock"), "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ConfigError(f"{self.run_dir}: run_dir is in use by another running porter")
        self._run_lock = lock
        images = os.path.join(self.run_dir, "images")
        st = os.lstat(images)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise ConfigError(f"{images}: owned by uid {st.st_uid} or writable by others: "
                              f"not removing what is in it; use a run_dir only this user can write")
        from cxlfork import image as image_mod
        import stat as stat_mod
        for name in sorted(os.listdir(images)):
            path = os.path.join(images, name)
            st = os.lstat(path)
            if not stat_mod.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                self.log(f"leaving {path}: not an image directory of uid {os.geteuid()}")
                continue
            try:
                image_mod.remove(path)
                self.log(f"removed {path}, left by a porter that did not stop")
            except CxlforkError as e:
                # not a sealed image of ours (corrupt, older format): its directory goes (in
                # our own images/), its page file is left to `cxlfork gc`
                shutil.rmtree(path, ignore_errors=True)
                self.log(f"removed {path}, left by an earlier porter, without its page file "
                         f"({e})")
            except OSError as e:
                self.log(f"removing {path}, left by an earlier porter: {e}")

    def stop(self) -> None:
        """Stop serving, kill every instance, remove checkpoints and the run directory."""
        self.stopping = True
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        with self.lock:
            pools = list(self.pools.values())
        for p in pools:
            p.stop()
        while True:                                # checkpoints queued but not taken
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job and job[0] in ("checkpoint", "reap"):
                job[2].kill()
                job[2].close()
        from cxlfork import image as image_mod
        if self.registry is not None:              # pool images stay published (registry)
            self.registry.release_all()
        for p in pools:
            if p.image and p.pool_image is None:
                try:
                    image_mod.remove(p.image)
                except (CxlforkError, OSError) as e:
                    self.log(f"removing {p.image}: {e}")
        self.lifeline.close()
        if self.cgroup is not None:
            self.cgroup.remove()
        if self.own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        elif self._run_lock is not None:
            self._run_lock.close()
            self._run_lock = None

    # -- main-thread jobs ----------------------------------------------------------------
    def _run_job(self, job) -> None:
        what, pool, inst = job
        if what == "checkpoint":
            self._checkpoint(pool, inst)
        elif what == "profile":
            self._profile(pool, inst)
        elif what == "first_profile":
            self._first_profile(pool, inst)
        elif what == "reap":
            pool.reap_lost(inst)

    def _checkpoint(self, pool: FunctionPool, inst) -> None:
        if self.registry is not None:
            return self._pool_checkpoint(pool, inst)
        from cxlfork.checkpoint import checkpoint
        self._images += 1
        image = os.path.join(self.run_dir, "images", f"{pool.name}.{self._images}.img")
        if hasattr(inst, "quiesce"):                 # an HTTP instance: only its listener
            inst.quiesce()
        try:
            r = checkpoint(inst.pid, image, self.cfg.store or None, kill=False,
                           warn=lambda m: self.log(f"checkpoint of {pool.name}: {m}"))
        except CxlforkError as e:
            if "interrupted by signal" in str(e):
                self.request_stop()
            self.log(f"checkpoint of {pool.name} (PID {inst.pid}) failed: {e}")
            pool.checkpoint_done(inst, None, {}, str(e))
            return
        self.store_dir = os.path.dirname(r["store"])
        info = {"ms": round(r["total_s"] * 1e3, 3), "frozen_ms": round(r["frozen_ms"], 3),
                "bytes": r["bytes"], "store_file": r["store"], "pid": inst.pid,
                "taken_after_invocations": inst.served}
        self.metrics.checkpoints.labels(pool.name).inc()
        self.log(f"checkpointed {pool.name} (PID {inst.pid}) after {inst.served} invocations: "
                 f"{r['bytes'] / 2**20:.1f} MiB in {r['total_s'] * 1e3:.0f} ms")
        pool.checkpoint_done(inst, image, info, None)
        self._prepare(pool)

    def _pool_checkpoint(self, pool: FunctionPool, inst) -> None:
        """Checkpoint into this host's region of the pool, registered for the function."""
        if hasattr(inst, "quiesce"):
            inst.quiesce()
        try:
            image, rec, r = self.registry.publish(inst.pid, pool.cfg)
        except CxlforkError as e:
            self.log(f"pool checkpoint of {pool.name} (PID {inst.pid}) failed: {e}")
            pool.checkpoint_done(inst, None, {}, str(e))
            return
        info = {"ms": round(r["total_s"] * 1e3, 3), "bytes": r["bytes"],
                "store_file": r["store"], "pid": inst.pid, "from_pool": r["name"],
                "remote": False, "taken_after_invocations": inst.served}
        self.metrics.checkpoints.labels(pool.name).inc()
        self.log(f"checkpointed {pool.name} (PID {inst.pid}) into the pool as {r['name']} "
                 f"after {inst.served} invocations: {r['bytes'] / 2**20:.1f} MiB in "
                 f"{r['total_s'] * 1e3:.0f} ms")
        pool.checkpoint_done(inst, image, info, None, pool_image=rec)
        self._prepare(pool)

    def _prepare(self, pool: FunctionPool) -> None:
        """Check and plan the restore now and make its ghost pool, off the request path."""
        if not pool.image or pool.restore_policy() == "cold":
            return
        try:
            prep = pool.prepared_restore(pool.restore_policy())
        except Exception as e:             # noqa: BLE001 - the request path retries it
            self.log(f"preparing the restore of {pool.name}: {e}")
            return
        pool.refresh_ghosts(prep)

    def _profile(self, pool: FunctionPool, inst) -> None:
        from cxlfork.profile import record
        if pool.profiled or inst.state == "dead" or not pool.image:
            return
        try:
            r = record(pool.image, [inst.pid])
        except CxlforkError as e:
            self.log(f"hot-page profile of {pool.name}: {e}")
            return
        pool.profiled = True
        pool.checkpoint_info["hot_pages"] = r["hot_pages"]
        self._prepare(pool)

    def _first_profile(self, pool: FunctionPool, inst) -> None:
        """ghost_prefault: what a restored instance's first request wrote (cxlfork.firstreq),
        recorded once per image; the next warm ghosts make those pages private ahead."""
        from cxlfork.firstreq import record
        if pool.first_profiled or inst.state == "dead" or not pool.image:
            return
        try:
            r = record(pool.image, [inst.pid])
        except CxlforkError as e:
            self.log(f"first-request profile of {pool.name}: {e}")
            return
        pool.first_profiled = True
        self._prepare(pool)                 # new warm ghosts, then /stats shows the count
        pool.checkpoint_info["first_request_pages"] = r["written_pages"] + r["zero_pages"]

    def _housekeeping(self, now: float, policies: bool) -> None:
        with self.lock:
            pools = list(self.pools.values())
        for p in pools:
            p.reap_gone_idle()
            p.sample_memory(self.store_dir, shared=policies)   # store pages once a second
        total = self.local_total()
        if self.cgroup is not None:
            try:
                self.cgroup_stats = self.cgroup.stats()
                total = self.cgroup_stats["working_set_bytes"]
            except (OSError, KeyError, ValueError) as e:
                self.log(f"reading the memory cgroup: {e}")
        self.pressure = total / self.limit if self.limit else 0.0
        self.metrics.pressure.set(self.pressure)
        short = self.pressure >= PRESSURE_SHORT_KEEPALIVE
        for p in pools:
            keep = min(p.cfg.keepalive_s, self.cfg.pressure_keepalive_s) if short \
                else p.cfg.keepalive_s
            p.reclaim(keep, now)
        if not policies:
            return
        for p in pools:
            if self.registry is not None and p.image is None:
                self._lookup(p)
            if p.cfg.policy == "auto":
                self._switch_policy(p, now)
            st = p.stats()
            self.metrics.update(p.name, st, (p.checkpoint_info or {}).get("bytes", 0),
                                (self.cgroup_stats.get("functions") or {}).get(p.name))

    def _switch_policy(self, p: FunctionPool, now: float) -> None:
        if now - p.policy_changed < policy_mod.HOLD_S:
            return
        p99 = p.window_p99(now, policy_mod.WINDOW_S)
        change = policy_mod.next_policy(p.policy, p99, p.cfg.slo_ms, self.pressure)
        if change is None:
            return
        new, why = change
        with p.cond:
            old, p.policy, p.policy_changed = p.policy, new, now
            p.switches.append({"t_s": round(now - self.started, 3), "from": old, "to": new,
                               "reason": why})
        self._prepare(p)                   # the new policy's plan and ghosts, now
        self.metrics.switches.labels(p.name, new).inc()
        self.metrics.set_policy(p.name, new)
        self.log(f"{p.name}: clone policy {old} -> {new} ({why})")

    def stats(self) -> dict:
        from cxlfork.restore import lazy_stats
        with self.lock:
            pools = dict(self.pools)
        fns = {n: p.stats() for n, p in sorted(pools.items())}
        return {"porter": {"uptime_s": round(time.monotonic() - self.started, 3),
                           "local_memory_bytes": sum(f["memory"]["local_bytes"]
                                                     for f in fns.values()),
                           "shared_memory_bytes": sum(f["memory"]["shared_bytes"]
                                                      for f in fns.values()),
                           "store_bytes": sum((p.checkpoint_info or {}).get("bytes", 0)
                                              for p in pools.values() if p.image),
                           "local_memory_limit_bytes": self.limit,
                           "pressure": round(self.pressure, 4),
                           "lazy_moa": lazy_stats(),
                           "ghost_pool": self.cfg.ghost_pool,
                           "ghost_prefault": self.cfg.ghost_prefault,
                           "cgroup": self.cgroup_stats or None},
                "functions": fns}
