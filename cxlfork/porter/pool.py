"""The instances of one function: acquire an instance for a request (an idle one = warm; else
scale out: restore from the checkpoint if there is one, else cold-start), release it, trigger
the checkpoint after K invocations, replace instances that crashed or hung, reclaim idle ones.
"""
from __future__ import annotations

import collections
import os
import threading
import time

import numpy as np

from cxlfork.errors import CxlforkError
from cxlfork.porter.config import FunctionConfig
from cxlfork.porter.http_instance import HttpInstance
from cxlfork.porter.instance import (Instance, WorkerBadAnswer, WorkerDied, WorkerFailed,
                                     WorkerTimeout, cxlfork_policy)

WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "NUMEXPR_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Unavailable(Exception):
    """No instance could be had (busy, memory limit, start failed, shutting down): 503/502."""

    def __init__(self, msg: str, status: int = 503):
        super().__init__(msg)
        self.status = status


class InvokeError(Exception):
    """The request failed in the worker: status 500 (its error), 502 (died), 504 (hung)."""

    def __init__(self, msg: str, status: int):
        super().__init__(msg)
        self.status = status


def percentiles(xs) -> dict:
    if not xs:
        return {"n": 0, "p50": None, "p99": None}
    a = np.asarray(xs, dtype=float)
    return {"n": len(a), "p50": round(float(np.percentile(a, 50)), 3),
            "p99": round(float(np.percentile(a, 99)), 3)}


class FunctionPool:
    def __init__(self, cfg: FunctionConfig, porter):
        self.cfg = cfg
        self.porter = porter
        self.name = cfg.name
        self.cond = threading.Condition()
        self.instances: list[Instance] = []
        self.idle: list[Instance] = []          # most recently used last
        self.starting = 0                       # reserved slots being started
        self.reserved_bytes = 0                 # their estimated local memory
        self.spawning: list[Instance] = []      # cold starts waiting for their init
        self.prepared: dict = {}                # (image, policy, profiled, first) -> prepared
        self.prepare_lock = threading.Lock()    # one preparation at a time
        self.image: str | None = None
        self.pool_image: dict | None = None     # its pool record (registry), or None
        self.checkpoint_pending = False
        self.checkpoint_info: dict = {}
        self.checkpoint_error: str | None = None
        self.profiled = False
        self.first_profiled = False             # first-request write profile (firstreq)
        self.policy = "mow" if cfg.policy in ("auto", "cold") else cfg.policy
        if cfg.policy == "cold":
            self.policy = "cold"
        self.policy_changed = 0.0
        self.switches: collections.deque = collections.deque(maxlen=20)
        self.starts = {"cold": 0, "warm": 0, "restored": 0}
        self.errors = collections.Counter()
        self.restore_failures: list[str] = []
        self.lat: collections.deque = collections.deque(maxlen=4096)   # (t, ms, start)
        self.start_ms = {"cold": collections.deque(maxlen=512),
                         "restored": collections.deque(maxlen=512)}
        self.start_phases = {"cold": collections.deque(maxlen=512),   # Instance.phases
                             "restored": collections.deque(maxlen=512)}
        self.est_local = {}                     # kind/policy -> last measured local bytes
        self.env = dict(os.environ, **WORKER_ENV, **cfg.env)
        self.log_path = os.path.join(porter.run_dir, f"{self.name}.log")
        self.log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND |
                              os.O_CLOEXEC, 0o600)
        self.cgroup = porter.cgroup             # the porter's MemoryCgroup, or None
        self.oom_seen = 0                       # OOM kills of this function accounted for
        self.ghosts = None                      # FunctionGhosts for the current restore

    def _error(self, kind: str) -> None:
        self.errors[kind] += 1
        self.porter.metrics.errors.labels(self.name, kind).inc()

    # -- request path --------------------------------------------------------------------
    def _start_kind(self) -> str:
        return "restored" if self.image and self.policy != "cold" else "cold"

    def acquire(self) -> tuple[Instance, str]:
        """An instance for one request: an idle one ("warm"), else a new one (restored or
        cold) if max_instances and the local memory limit allow, else wait (queue_timeout_s).
        """
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.cfg.queue_timeout_s
        tried_reclaim = False
        while True:
            with self.cond:
                if self.porter.stopping:
                    raise Unavailable("the porter is shutting down")
                while self.idle:
                    inst = self.idle.pop()
                    if inst.gone():              # died while idle (e.g. OOM-killed)
                        self.instances.remove(inst)
                        inst.state = "lost"
                        self.porter.jobs.put(("reap", self, inst))
                        continue
                    inst.state = "busy"
                    return inst, "warm"
                total = len(self.instances) + self.starting
                est = self.est_local.get(self.restore_policy(), 0)
                memory_blocked = False
                if total < self.cfg.max_instances:
                    # the limit is a cgroup's: starting past it would make the kernel
                    # OOM-kill an instance, so even a function with none waits for room
                    if self.porter.memory_allows(est):
                        self.starting += 1
                        self.reserved_bytes += est       # counted until it is running
                        break
                    if est > self.porter.limit:
                        raise Unavailable(
                            f"function {self.name}: one {self.restore_policy()} instance "
                            f"needs about {est / 2**20:.1f} MiB, more than the local memory "
                            f"limit of {self.porter.limit / 2**20:g} MiB")
                    memory_blocked = True
                if not memory_blocked or tried_reclaim:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        why = (f"the local memory limit ({self.porter.limit / 2**20:g} MiB) "
                               f"is reached" if memory_blocked else
                               f"all {total} instances are busy")
                        raise Unavailable(f"function {self.name}: {why} (waited "
                                          f"{self.cfg.queue_timeout_s:g} s)")
                    self.cond.wait(min(left, 0.25))
                    continue
            tried_reclaim = True                 # outside the lock: other pools' locks
            self.porter.reclaim_idle(need=est, exclude=self)
        queued_ms = (time.perf_counter() - t0) * 1e3
        try:
            inst = self._new_instance()
            inst.phases["queue"] = queued_ms
        finally:
            with self.cond:
                self.starting -= 1
                self.reserved_bytes -= est
                self.cond.notify()
        with self.cond:
            if self.porter.stopping or inst.state == "dead":
                gone = True
            else:
                gone = False
                inst.state = "busy"
        if gone:
            inst.kill()
            inst.close()
            with self.cond:
                if inst in self.instances:
                    self.instances.remove(inst)
            raise Unavailable("the porter is shutting down")
        return inst, inst.kind

    def restore_policy(self) -> str:
        """How the next new instance starts: "cold", or the clone policy of its restore
        (hybrid without a hot-page record yet restores as mow)."""
        if self._start_kind() == "cold":
            return "cold"
        return "mow" if self.policy == "hybrid" and not self.profiled else self.policy

    def _new_instance(self) -> Instance:
        """Start one instance and list it in self.instances."""
        if self._start_kind() == "restored":
            policy = self.restore_policy()
            try:
                t0 = time.perf_counter()
                prepared = self.prepared_restore(policy)
                prep_ms = (time.perf_counter() - t0) * 1e3
                ghosts = self.ghosts
                source = ghosts.source(prepared) if ghosts else None
                if self.cfg.protocol == "stdio":
                    inst = Instance.restore(self.image, policy, self.log_fd, prepared, source,
                                            self.cgroup_dir())
                else:
                    inst = HttpInstance.restore(self.cfg.protocol, self.name, self.image,
                                                policy, self.log_fd, prepared, source,
                                                self.cgroup_dir(), self.porter.lifeline)
                    self._await_listener(inst)
                inst.phases["prepare"] = prep_ms
            except Exception as e:             # noqa: BLE001 - served by a cold start instead
                msg = str(e) if isinstance(e, CxlforkError) else f"{type(e).__name__}: {e}"
                self.restore_failures.append(msg)
                self._error("restore_failed")
                self.porter.log(f"restore of {self.name} failed, cold-starting instead: {msg}")
            else:
                inst.local_bytes = self.est_local.get(policy, 0)
                with self.cond:
                    self.instances.append(inst)
                    self.start_ms["restored"].append(inst.start_ms)
                return inst
        try:
            cg = self.cgroup.procs_fd(self.name) if self.cgroup else -1
            if self.cfg.protocol == "stdio":
                inst = Instance.spawn(self.cfg.command, self.env, self.log_fd, cg)
            else:
                inst = HttpInstance.spawn(self.cfg.protocol, self.name, self.cfg.command,
                                          self.env, self.log_fd, cg)
        except WorkerDied as e:
            self._error("cold_start_failed")
            raise Unavailable(f"function {self.name}: cold start failed: {e}", 502) from e
        inst.local_bytes = self.est_local.get("cold", 0)
        with self.cond:
            self.spawning.append(inst)           # stop() kills it while it initialises
        try:
            inst.initialise(self.cfg.init, self.cfg.init_timeout_s)
        except (WorkerDied, WorkerTimeout) as e:
            inst.kill()
            inst.close()
            with self.cond:
                self.spawning.remove(inst)
            self._error("cold_start_failed")
            if self.porter.stopping:
                raise Unavailable("the porter is shutting down") from e
            raise Unavailable(f"function {self.name}: cold start failed: {e} (log: "
                              f"{self.log_path})", 502) from e
        with self.cond:
            self.spawning.remove(inst)
            self.instances.append(inst)
            self.start_ms["cold"].append(inst.start_ms)
        return inst

    def _await_listener(self, inst: HttpInstance) -> None:
        """A restored HTTP clone: its listener was made again by cxlfork, so it accepts at
        once; a clone that does not is killed and the start fails over to a cold start."""
        t0 = time.perf_counter()
        try:
            inst.wait_listening(min(self.cfg.init_timeout_s, 10.0))
        except (WorkerDied, WorkerTimeout) as e:
            inst.kill()
            inst.close()
            raise CxlforkError(f"restored clone PID {inst.pid} does not accept on "
                               f"127.0.0.1:8080 in its namespace: {e}") from e
        inst.phases["connect"] = (time.perf_counter() - t0) * 1e3

    def prepared_restore(self, policy: str):
        """The image checked and planned once per (policy, hot-page record)."""
        from cxlfork.restore import prepare_restore
        key = (self.image, policy, self.profiled, self.first_profiled)
        with self.cond:
            prep = self.prepared.get(key)
        if prep is not None:
            return prep
        with self.prepare_lock:                  # not under self.cond: releases go on
            with self.cond:
                prep = self.prepared.get(key)
            if prep is None:
                cx_policy, eager = cxlfork_policy(policy)
                if self.pool_image is not None:  # DAX: no userfaultfd minor faults
                    cx_policy, eager = ("moa", True) if cx_policy == "moa" else ("mow", False)
                prep = prepare_restore(key[0], cx_policy, eager=eager)
                with self.cond:
                    if self.porter.stopping:
                        prep.close()
                        raise CxlforkError("the porter is shutting down")
                    self.prepared[key] = prep
            return prep

    def cgroup_dir(self) -> str | None:
        """The function's memory cgroup (where its instances and ghosts are born), or None."""
        return self.cgroup.functions[self.name] if self.cgroup is not None else None

    def refresh_ghosts(self, prepared) -> None:
        """Make the ghost pool serve `prepared` (warm for it where possible), replacing one
        made for another policy or profile (main thread: spawning warm ghosts takes a
        while)."""
        from cxlfork.porter.ghosts import FunctionGhosts
        if self.porter.cfg.ghost_pool == 0 or self.porter.stopping:
            return
        if self.ghosts is not None and self.ghosts.suits(prepared):
            return
        try:
            new = FunctionGhosts(self.name, self.porter.cfg.ghost_pool, self.cgroup_dir(),
                                 prepared, self.porter.cfg.ghost_prefault)
        except CxlforkError as e:                 # restores spawn their restorer
            self.porter.log(f"ghost pool of {self.name}: {e}")
            return
        with self.cond:
            old, self.ghosts = self.ghosts, new
            if self.porter.stopping:              # stop() has taken self.ghosts already
                old, self.ghosts = new, None
        if old is not None:
            old.close()

    def invoke(self, payload) -> tuple[object, str, Instance, float]:
        """Run one request; returns (output, start kind, instance, latency ms)."""
        t0 = time.perf_counter()
        inst, start = self.acquire()
        t1 = time.perf_counter()
        try:
            out = inst.call(payload, self.cfg.timeout_s)
        except WorkerFailed as e:
            self._error("function_error")
            self.release(inst)
            raise InvokeError(f"function {self.name}: {e}", 500) from e
        except WorkerTimeout as e:
            self._error("timeout")
            self._lose(inst)
            raise InvokeError(f"function {self.name}: instance PID {inst.pid} ({inst.kind}) "
                              f"gave no answer within {self.cfg.timeout_s:g} s; it was killed "
                              "and is being replaced", 504) from e
        except WorkerDied as e:
            how = self._lose(inst)
            self._error("oom_kill" if "OOM" in how else "crash")
            if self.porter.stopping:
                raise Unavailable("the porter is shutting down") from e
            if isinstance(e, WorkerBadAnswer):      # alive, but broke the protocol
                how = f"{e}; it was killed"
            raise InvokeError(f"function {self.name}: instance PID {inst.pid} ({inst.kind}) "
                              f"{how} while handling the request; it is being replaced "
                              f"(log: {self.log_path})", 502) from e
        t2 = time.perf_counter()
        ms = (t2 - t0) * 1e3
        with self.cond:
            if start != "warm":
                inst.phases["first_request"] = (t2 - t1) * 1e3
                self.start_phases[start].append(inst.phases)
            self.starts[start] += 1
            self.lat.append((time.monotonic(), ms, start))
        self.porter.metrics.observe(self.name, start, ms)
        self.release(inst)
        return out, start, inst, ms

    def release(self, inst: Instance) -> None:
        with self.cond:
            inst.served += 1
            inst.last_used = time.monotonic()
            if inst.state != "busy":
                return
            if (self.cfg.policy != "cold" and self.image is None and not self.checkpoint_pending
                    and self.checkpoint_error is None and inst.kind == "cold"
                    and inst.served >= self.cfg.checkpoint_after and not self.porter.stopping):
                inst.state = "checkpointing"
                self.checkpoint_pending = True
                self.porter.jobs.put(("checkpoint", self, inst))
                return
            if (inst.kind == "restored" and inst.served == 1 and not self.first_profiled
                    and self.porter.cfg.ghost_prefault and self.porter.cfg.ghost_pool > 0):
                self.porter.jobs.put(("first_profile", self, inst))
            if (inst.kind == "restored" and inst.served == 2 and not self.profiled
                    and self.cfg.policy in ("auto", "hybrid") and self.pool_image is None):
                self.porter.jobs.put(("profile", self, inst))
            inst.state = "idle"
            self.idle.append(inst)
            self.cond.notify()

    def _lose(self, inst: Instance) -> str:
        """Kill and forget an instance that crashed or hung; start a replacement. Returns
        how it ended (naming the OOM killer when the cgroup counted a kill)."""
        how = inst.kill()
        inst.close()
        if self.oom_killed():
            how += (" (the kernel's OOM killer: the porter's memory cgroup reached its limit "
                    f"of {self.porter.limit / 2**20:g} MiB)")
        with self.cond:
            if inst in self.instances:
                self.instances.remove(inst)
            self.cond.notify()
        if not self.porter.stopping:
            threading.Thread(target=self._replace, name=f"replace-{self.name}",
                             daemon=True).start()
        return how

    def oom_killed(self) -> bool:
        """True (once per kill) when the cgroup counted a new OOM kill in this function."""
        if self.cgroup is None:
            return False
        n = self.cgroup.oom_kills(self.name)
        with self.cond:
            new, self.oom_seen = n > self.oom_seen, max(n, self.oom_seen)
        return new

    def reap_gone_idle(self) -> None:
        """Take idle instances that died (OOM-killed while idle, ...) off the pool and reap
        them (housekeeping, each tick: one select per idle instance)."""
        with self.cond:
            gone = [i for i in self.idle if i.gone()]
            for inst in gone:
                self.idle.remove(inst)
                self.instances.remove(inst)
                inst.state = "lost"
        for inst in gone:
            self.reap_lost(inst)

    def reap_lost(self, inst: Instance) -> None:
        """An instance found dead while idle (main thread): reap it, count it, replace it."""
        inst.kill()
        inst.close()
        self._error("oom_kill" if self.oom_killed() else "died_idle")
        self.porter.log(f"{self.name}: idle instance PID {inst.pid} {inst.exit_text}")

    def _replace(self) -> None:
        try:
            inst, _ = self.acquire()
        except (Unavailable, InvokeError):
            return
        with self.cond:
            inst.state = "idle"
            self.idle.append(inst)
            self.cond.notify()

    # -- housekeeping (the porter's main thread) -----------------------------------------
    def checkpoint_done(self, inst: Instance, image: str | None, info: dict,
                        error: str | None, pool_image: dict | None = None) -> None:
        with self.cond:
            self.checkpoint_pending = False
            if image:
                self.image, self.checkpoint_info = image, info
                self.pool_image = pool_image
            elif inst.gone():
                # the instance died under the checkpoint (e.g. OOM-killed): not a refusal,
                # the next cold instance that served K invocations is checkpointed
                self.checkpoint_info = {"last_failure": error}
            else:
                self.checkpoint_error = error
            if inst.state == "checkpointing":
                inst.state = "idle"
                inst.last_used = time.monotonic()
                self.idle.append(inst)
            self.cond.notify()

    def reclaim(self, keepalive_s: float, now: float, force: bool = False,
                need: int = 0) -> int:
        """Kill idle instances unused for keepalive_s (all idle ones with force, oldest
        first, until `need` bytes are freed). Returns the local bytes freed."""
        victims = []
        freed = 0
        with self.cond:
            for inst in list(self.idle):
                if force or now - inst.last_used >= keepalive_s:
                    if force and need and freed >= need:
                        break
                    self.idle.remove(inst)
                    self.instances.remove(inst)
                    victims.append(inst)
                    freed += inst.local_bytes
        for inst in victims:
            inst.kill()
            inst.close()
        return freed

    def sample_memory(self, store_dir: str | None, shared: bool = True) -> None:
        """Local memory of every instance; with `shared` also the store pages of the
        restored ones (cold instances map no store)."""
        from cxlfork.porter.memory import local_memory, store_memory
        with self.cond:
            live = [i for i in self.instances if i.state != "dead"]
        for inst in live:
            loc = local_memory(inst.pid)
            if loc:
                inst.local_bytes = loc
                if shared and store_dir and inst.kind == "restored":
                    inst.shared_bytes = store_memory(inst.pid, store_dir)
                # the largest seen: lazy moa and mow clones grow as they serve requests
                self.est_local[inst.policy] = max(loc, self.est_local.get(inst.policy, 0))

    def window_p99(self, now: float, window_s: float) -> float | None:
        with self.cond:
            xs = [ms for t, ms, start in self.lat if now - t <= window_s and start != "cold"]
        if len(xs) < 8:
            return None
        return float(np.percentile(xs, 99))

    def stop(self, wait_s: float = 10.0) -> None:
        """Kill every instance (the porter's `stopping` is already set). Busy instances'
        pipes are closed by their request threads; idle ones here."""
        with self.cond:
            insts = list(self.instances) + list(self.spawning)
            self.instances.clear()
            self.idle.clear()
            self.cond.notify_all()
        for inst in insts:
            busy = inst.state in ("busy", "starting")
            inst.kill()
            if not busy:
                inst.close()
        deadline = time.monotonic() + wait_s
        with self.cond:
            while (self.starting or self.spawning) and time.monotonic() < deadline:
                for inst in self.spawning:
                    inst.kill()
                self.cond.wait(0.1)
            prepared, self.prepared = list(self.prepared.values()), {}
            ghosts, self.ghosts = self.ghosts, None
        if ghosts is not None:
            ghosts.close()
        for prep in prepared:
            prep.close()
        os.close(self.log_fd)

    def stats(self) -> dict:
        with self.cond:
            lat = list(self.lat)
            insts = list(self.instances)
            d = {
                "policy": self.policy, "policy_mode": self.cfg.policy,
                "slo_ms": self.cfg.slo_ms,
                "instances": len(insts), "starting": self.starting,
                "idle": sum(i.state == "idle" for i in insts),
                "busy": sum(i.state == "busy" for i in insts),
                "starts": dict(self.starts),
                "errors": dict(self.errors),
                "checkpoint": {"image": self.image, "after": self.cfg.checkpoint_after,
                               "pool_image": (f"h{self.pool_image['host']}/"
                                              f"{self.pool_image['name']}"
                                              if self.pool_image else None),
                               "pending": self.checkpoint_pending,
                               "error": self.checkpoint_error, **self.checkpoint_info},
                "hot_profile": self.profiled,
                "first_request_profile": self.first_profiled,
                "policy_switches": list(self.switches),
                "restore_failures": self.restore_failures[-3:],
                "ghosts": self.ghosts.stats() if self.ghosts else None,
            }
        d["latency_ms"] = {"all": percentiles([x[1] for x in lat])}
        for k in ("cold", "warm", "restored"):
            d["latency_ms"][k] = percentiles([x[1] for x in lat if x[2] == k])
        d["start_ms"] = {k: percentiles(list(v)) for k, v in self.start_ms.items()}
        with self.cond:
            phases = {k: list(v) for k, v in self.start_phases.items()}
        d["start_phases_ms"] = {
            k: {ph: percentiles([x[ph] for x in v if ph in x])
                for ph in dict.fromkeys(ph for x in v for ph in x)}
            for k, v in phases.items()}
        d["memory"] = {"local_bytes": sum(i.local_bytes for i in insts),
                       "shared_bytes": sum(i.shared_bytes for i in insts)}
        d["instance_list"] = [{"pid": i.pid, "kind": i.kind, "policy": i.policy,
                               "state": i.state, "served": i.served,
                               "local_bytes": i.local_bytes, "shared_bytes": i.shared_bytes,
                               "start_ms": round(i.start_ms, 3),
                               "start_phases_ms": {k: round(v, 3)
                                                   for k, v in dict(i.phases).items()}}
                              for i in insts]
        return d
