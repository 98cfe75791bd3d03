"""Drives tiermemd end to end inside the emulated CXL machine and prints one JSON result.

    daemon_scenario.py promote WORKDIR POLICY     hot set on the slow node, tiermemd promotes
    daemon_scenario.py promote WORKDIR POLICY [LIMIT_S TOTAL_MB HOT_MB TO_LIMIT]
    daemon_scenario.py kernel  WORKDIR [LIMIT_S TOTAL_MB HOT_MB TO_LIMIT RATE_MBPS]
                                                  the same under kernel NUMA-balancing tiering
    daemon_scenario.py cpu     WORKDIR [TOTAL_MB HOT_MB SAMPLER WARM_S WINDOW_S RESCAN]
    daemon_scenario.py faults  WORKDIR            exits/forks/execs, raising policy, missing
                                                  sampler, full fast tier, kill -9 + restart
Used by tests/test_daemon_vm.py (assertions there) and bench/bench_daemon.py.
"""
import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time

from tiermemd.kernel_tiering import kernel_tiering, kernel_tiering_off, vmstat_delta
from tiermemd.workload import WorkloadProcess as Workload

PY = sys.executable
DAMON = "/sys/kernel/mm/damon/admin/kdamonds"
DAMON_STATE = "/run/tiermem/damon.json"     # tiermem.damon_sysfs.STATE_FILE


def _read_int(path):
    try:
        return int(open(path).read())
    except (OSError, ValueError):
        return -1


# The settings tiermemd's demo and bench use (daemon/tiermemd/demo.py has the same): DAMON
# starts from 200 regions (its default 10 leaves the hot set inside ~100 MiB regions for
# many aggregations), m5 promotes anything sampled hot at all while there is room, at the
# full budget from the first interval.
DAMON_PARAMS = "sample_us = 5000\naggr_us = 100000\nmin_nr_regions = 200"
M5_PARAMS = "top_k = 16384\nhot_min = 0.25\nrate_init_pct = 100.0\nbreak_even = 0.05"


def kdamonds_on():
    out = []
    for d in glob.glob(DAMON + "/[0-9]*"):
        try:
            if open(d + "/state").read().strip() == "on":
                out.append(int(os.path.basename(d)))
        except OSError:
            pass
    return out


def rundir(wd):
    """Socket and state live on a local file system (a unix socket cannot be bound on the
    9p share the work folder is on)."""
    d = "/run/tiermemd-test-" + os.path.basename(wd.rstrip("/"))
    os.makedirs(d, exist_ok=True)
    return d


def write_config(wd, targets, extra="", bandwidth="64MB/s", rescan=5):
    path = os.path.join(wd, "tiermemd.toml")
    with open(path, "w") as f:
        f.write(f"""[daemon]
interval = "1s"
socket = "{rundir(wd)}/ctl.sock"
state_dir = "{rundir(wd)}/state"
metrics = "127.0.0.1:9473"
rescan_every = {rescan}
[migration]
bandwidth = "{bandwidth}"
batch_pages = 256
{extra}
""" + targets)
    return path


class Daemon:
    def __init__(self, wd, cfg, name="d"):
        self.wd, self.log = wd, os.path.join(wd, f"{name}.log")
        self.p = subprocess.Popen([PY, "-m", "tiermemd", "-f", "-v", "-c", cfg],
                                  stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        for _ in range(600):
            if self.p.poll() is not None or " serving: " in self.text():
                break
            time.sleep(0.1)

    def ctl(self, cmd, **kw):
        """One control request over the socket (tiermem.control.request, what `tiermem
        ctl` uses; the CLI itself is exercised by the host tests: starting it costs tens of
        seconds under TCG)."""
        from tiermem.errors import TiermemError
        from tiermem.control import request
        try:
            return {"rc": 0, "out": request(os.path.join(rundir(self.wd), "ctl.sock"),
                                            dict(cmd=cmd, **kw), timeout=120), "err": ""}
        except TiermemError as e:
            return {"rc": 1, "out": None, "err": str(e)}

    def stats(self):
        r = self.ctl("stats")
        return r["out"] if r["rc"] == 0 else r

    def wait_loops(self, n, timeout=600):
        """Until the daemon has run n loops (the guest is slow under TCG: count loops, not
        seconds)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout and self.p.poll() is None:
            st = self.stats()
            if st.get("ok") and st["loops"] >= n:
                return
            time.sleep(1)

    def wait_damon_on(self, target, nprocs, max_loops=90):
        """Until target has nprocs processes and this daemon's kdamond runs on one of them
        (DAMON follows one process at a time): on in sysfs, recorded in tiermem's DAMON
        state file as owned by this daemon, its DAMON target one of the target's PIDs.
        Counted in loops, not seconds (the DAMON group restarts when its process changes;
        a failed start waits 30 s before the next try). Returns the loops it took."""
        first = last = None
        while self.p.poll() is None:
            st, status = self.stats(), self.ctl("status")["out"]
            if not st.get("ok") or status is None:
                time.sleep(1)
                continue
            first = st["loops"] if first is None else first
            last = st["loops"]
            pids = next(t["pids"] for t in status["targets"] if t["name"] == target)
            try:
                rec = json.load(open(DAMON_STATE))
            except (OSError, ValueError):
                rec = {}
            i = rec.get("index")
            kd = f"{DAMON}/{i}"
            if (len(pids) == nprocs and rec.get("owner_pid") == self.p.pid
                    and i in kdamonds_on() and _read_int(kd + "/pid") == rec["kdamond_pid"]
                    and {_read_int(t + "/pid_target") for t in
                         glob.glob(kd + "/contexts/0/targets/[0-9]*")} <= set(pids)
                    and glob.glob(kd + "/contexts/0/targets/[0-9]*")):
                return last - first
            if last - first > max_loops:
                break
            time.sleep(1)
        raise RuntimeError(f"tiermemd's kdamond did not come to run on a process of "
                           f"target {target} ({nprocs} processes) in {max_loops} loops (or "
                           f"the daemon died):\n{self.text()}")

    def stop(self, sig=signal.SIGTERM):
        self.p.send_signal(sig)
        try:
            return self.p.wait(60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return "timeout"

    def text(self):
        return open(self.log).read()


def after_stop(wd):
    return {"kdamonds_on": kdamonds_on(),
            "socket_left": os.path.exists(os.path.join(rundir(wd), "ctl.sock")),
            "state_left": os.path.exists(os.path.join(rundir(wd), "state", "state.json")),
            "kprobe_events": open("/sys/kernel/tracing/kprobe_events").read()
            if os.path.exists("/sys/kernel/tracing/kprobe_events") else ""}


def watch_hot(w, limit_s, to_limit, alive=lambda: True):
    """The hot set's fast-tier share every 2 s: until it reaches 90 % (to_limit=0) or for
    the whole limit (to_limit=1, so the steady state after t90 is seen too)."""
    series, t90, t0 = [], None, time.monotonic()
    while time.monotonic() - t0 < limit_s and alive():
        s = w.hot_share()
        t = time.monotonic() - t0
        series.append([round(t, 2), round(s, 4)])
        if s >= 0.9 and t90 is None:
            t90 = round(t, 2)
            if not to_limit:
                break
        time.sleep(2)
    return series, t90


def promote(wd, policy, limit_s=120, total=192, hot=48, to_limit=0):
    """tiermemd runs first, as a service does (its sampler prewarmed), then the workload
    starts; the clock runs from the workload's ready, as in the kernel scenario."""
    params = {"m5": M5_PARAMS, "damon": "", "tpp": ""}.get(policy, "")
    cfg = write_config(wd, f"""[[targets]]
name = "w"
cmdline = "tiermemd.workload {total} {hot} 1"
sampler = "damon"
policy = "{policy}"
[targets.sampler_params]
{DAMON_PARAMS}
[targets.policy_params]
{params}
""")
    d = Daemon(wd, cfg)
    w = None
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120 and d.p.poll() is None and \
                " prewarmed in " not in d.text():
            time.sleep(0.2)
        w = Workload(total, hot, 1)
        res = {"info": w.info, "share_before": w.hot_share()}
        res["series"], res["t90"] = watch_hot(w, limit_s, to_limit,
                                              lambda: d.p.poll() is None)
        res["where"] = w.where()
        res["stats"] = d.stats()
        res["status"] = d.ctl("status")["out"]
        try:
            import urllib.request
            res["metrics"] = urllib.request.urlopen("http://127.0.0.1:9473/metrics",
                                                    timeout=10).read().decode()
        except OSError as e:
            res["metrics"] = f"error {e}"
        res["pause"] = d.ctl("pause")
        res["status_paused"] = d.ctl("status")["out"]["paused"]
        res["resume"] = d.ctl("resume")
        res["switched_to"] = "m5" if policy == "tpp" else "tpp"
        res["policy_switch"] = d.ctl("policy", target="w", policy=res["switched_to"])
        res["policy_after_switch"] = d.ctl("status")["out"]["targets"][0]["policy"]
        res["policy_bad"] = d.ctl("policy", target="w", policy="nosuch")
        with open(cfg, "a") as f:
            f.write("\n[watermarks]\nlow = \"12 parsecs\"\n")
        os.kill(d.p.pid, signal.SIGHUP)
        res["reload_bad"] = d.ctl("reload")
        time.sleep(1.5)
        res["alive_after_bad_reload"] = d.p.poll() is None
        res["verify"] = w.ask("verify")
        res["stop_rc"] = d.stop()
        res["after"] = after_stop(wd)
        res["verify_after"] = w.ask("verify")
    finally:
        if d.p.poll() is None:
            d.stop(signal.SIGKILL)
        if w is None:
            res = {"exception": "the workload did not start", "log": d.text()}
        res["log"] = d.text()
        if w is not None:
            w.close()
    return res


def kernel(wd, limit_s=120, total=192, hot=48, to_limit=0, rate_mbps=0):
    """The kernel's own tiering on the same workload: NUMA balancing in memory-tiering mode
    (numa_balancing=2) with demotion on; no tiermemd. rate_mbps > 0: the promotion rate
    limit (tiermemd.kernel_tiering)."""
    res = {}
    with kernel_tiering(rate_mbps) as rec:
        res.update(knobs_set=rec["set"], knobs_before=rec["before"], debugfs=rec["debugfs"])
        w = Workload(total, hot, 1)
        try:
            res["series"], res["t90"] = watch_hot(w, limit_s, to_limit)
            res["vmstat_delta"] = vmstat_delta(rec)
            res["where"] = w.where()
            res["verify"] = w.ask("verify")
        finally:
            w.close()
    return res


def proc_cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def cpu(wd, total=1024, hot=64, sampler="damon", warm_s=20, window_s=30, rescan=10):
    """The daemon's own CPU cost on one TOTAL MiB target (already on the fast node, so the
    loop is sampling + policy + placement upkeep, few moves)."""
    w = Workload(total, hot, 0)
    cfg = write_config(wd, f"""[[targets]]
name = "w"
cmdline = "tiermemd.workload {total} {hot} 0"
sampler = "{sampler}"
policy = "m5"
""", rescan=rescan)
    d = Daemon(wd, cfg)
    res = {}
    try:
        time.sleep(warm_s)
        s0, c0, t0 = d.stats(), proc_cpu(d.p.pid), time.monotonic()
        time.sleep(window_s)
        s1, c1, t1 = d.stats(), proc_cpu(d.p.pid), time.monotonic()
        res = {"daemon_cpu_pct": 100 * (c1 - c0) / (t1 - t0),
               "sampler_cpu_pct": 100 * (s1["targets"]["w"]["sampler_cpu_seconds"]
                                         - s0["targets"]["w"]["sampler_cpu_seconds"]) / (t1 - t0),
               "loops": s1["loops"] - s0["loops"], "window_s": t1 - t0,
               "loop_seconds": s1["loop_seconds"], "verify": w.ask("verify")}
    finally:
        d.stop()
        res["log"] = d.text()
        w.close()
    return res


PROMOTE_ALL_POLICY = '''
import numpy as np
from tiermem.policies.base import MigrationPlan, Policy, SLOW
class PromoteAll(Policy):
    """Promotes every slow page the budget and the fast tier's free memory allow."""
    name = "promote-all"
    params = {}
    def observe(self, batch):
        pass
    def plan(self, placement, capacity, budget):
        n = max(0, min(budget.pages, capacity.fast_pages - placement.count(0)))
        slow = placement.on(SLOW)[:n]
        return MigrationPlan(promote=slow)
'''

FAILING_POLICY = '''
from tiermem.policies.base import MigrationPlan, Param, Policy
class Boom(Policy):
    """Raises in plan, or (fails = "observe") in observe."""
    name = "boom"
    params = {"fails": Param(str, "plan", "where it raises", choices=("plan", "observe"))}
    def observe(self, batch):
        if self.p["fails"] == "observe":
            raise RuntimeError("deliberate failure in observe")
    def plan(self, placement, capacity, budget):
        if self.p["fails"] == "plan":
            raise RuntimeError("deliberate failure in plan")
        return MigrationPlan()
'''


def faults(wd):
    res = {}
    with open(os.path.join(wd, "boom.py"), "w") as f:
        f.write(FAILING_POLICY)
    with open(os.path.join(wd, "promote_all.py"), "w") as f:
        f.write(PROMOTE_ALL_POLICY)
    # the workloads start side by side (each fills its memory with its pattern)
    ws = {name: Workload(mb, 4, 1, name, wait=False)
          for name, mb in (("exits", 16), ("dmn", 16), ("raises", 16), ("obsraises", 16),
                           ("nosampler", 16), ("good", 160))}
    for w in ws.values():
        w.ready()
    # fill the fast node, leaving 112 MiB, so promoting 'good' runs into ENOMEM; its page
    # cache counts as room (the kernel reclaims it for the hog and for promotions alike)
    mi = {ln.split()[2].rstrip(":"): int(ln.split()[3])
          for ln in open("/sys/devices/system/node/node0/meminfo")}
    room_kb = mi["MemFree"] + mi["Active(file)"] + mi["Inactive(file)"]
    res["hog_mb"] = max(64, room_kb // 1024 - 112)
    hog = subprocess.Popen([PY, __file__, "hog", wd, str(res["hog_mb"])],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if hog.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the fast-node hog did not start (status {hog.wait()})")
    go = os.path.join(wd, "exec-now")
    if os.path.exists(go):
        os.unlink(go)
    execer = subprocess.Popen(["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.2; done; "
                                           "exec sleep 600"])
    targets = ""
    for name, smp, pol in (("exits", "damon", "m5"), ("dmn", "damon", "m5"),
                           ("raises", "none", "boom"), ("obsraises", "pagemap", "boom"),
                           ("nosampler", "idle", "m5"), ("good", "none", "promote-all")):
        targets += f"""[[targets]]
name = "{name}"
cmdline = "tiermemd.workload .* {name}$"
sampler = "{smp}"
policy = "{pol}"
""" + ('policy_file = "boom.py"\n' if pol == "boom" else "") \
            + ('policy_file = "promote_all.py"\n' if pol == "promote-all" else "") \
            + ('[targets.sampler_params]\nmode = "present"\n'
               '[targets.policy_params]\nfails = "observe"\n' if name == "obsraises" else "")
    targets += f"""[[targets]]
name = "execer"
pids = [{execer.pid}]
policy = "first-touch"
"""
    cfg = write_config(wd, targets, '[watermarks]\nlow = "0%"\nmin = "0%"\n',
                       bandwidth="512MB/s")
    d = Daemon(wd, cfg)
    try:
        d.wait_loops(3)
        open(go, "w").close()                        # the execer target execs now
        ws["exits"].p.kill()                         # a target exits mid-loop
        ws["exits"].p.wait()
        res["forked_child"] = int(ws["dmn"].ask("fork"))   # picked up: same cmdline
        d.wait_loops(d.stats()["loops"] + 4)
        # kill -9 must find the DAMON sampler running on dmn and its child: wait for that
        # (the group restarts after the exit and the fork; a failed try waits 30 s)
        res["loops_to_damon_on"] = d.wait_damon_on("dmn", 2)
        res["stats"] = d.stats()
        res["status"] = d.ctl("status")["out"]
        res["alive"] = d.p.poll() is None
        res["kdamonds_before_kill"] = kdamonds_on()
        d.stop(signal.SIGKILL)                      # kill -9: stale kdamond, socket, state
        res["after_kill9"] = {"kdamonds_on": kdamonds_on(),
                              "socket_left": os.path.exists(os.path.join(rundir(wd),
                                                                         "ctl.sock")),
                              "workloads_alive": {k: w.p.poll() is None for k, w in ws.items()
                                                  if k != "exits"}}
        res["log1"] = d.text()
        d2 = Daemon(wd, cfg, "d2")
        d2.wait_loops(2)
        res["stats2"] = d2.stats()
        res["stop_rc"] = d2.stop()
        res["after"] = after_stop(wd)
        res["log2"] = d2.text()
        res["verify"] = {k: w.ask("verify") for k, w in ws.items() if k != "exits"}
        res["where_good"] = ws["good"].where()
    finally:
        for p in (d, locals().get("d2")):
            if p is not None and p.p.poll() is None:
                p.stop(signal.SIGKILL)
        if res.get("forked_child"):
            try:
                os.kill(res["forked_child"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        execer.kill()
        hog.kill()
        hog.wait()
        for w in ws.values():
            w.close()
    return res


def hog(mb):
    """Holds MB MiB of zero-filled memory on node 0 (mbind + MADV_POPULATE_WRITE: the kernel
    fills it, no Python loop) until stdin closes."""
    import mmap
    import numpy as np
    from tiermem import native
    size = mb << 20
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    native.mbind(np.frombuffer(buf, np.uint8).ctypes.data, size, native.MPOL_BIND, [0])
    buf.madvise(23)                                   # MADV_POPULATE_WRITE (Linux 5.14)
    print("ready", flush=True)
    sys.stdin.read()


def run(kind, wd):
    args = sys.argv[3:]
    if kind == "promote":
        return promote(wd, args[0] if args else "m5", *(int(x) for x in args[1:]))
    if kind == "kernel":
        return kernel(wd, *(int(x) for x in args))
    if kind == "cpu":
        return cpu(wd, *(int(x) for x in args[:2]), *args[2:3], *(int(x) for x in args[3:]))
    return faults(wd)


if __name__ == "__main__":
    kind, wd = sys.argv[1], sys.argv[2]
    if kind == "hog":
        hog(int(sys.argv[3]))
        sys.exit(0)
    os.makedirs(wd, exist_ok=True)
    try:
        # tiermemd alone: the guest boots with numa_balancing=1, which would promote too
        with kernel_tiering_off() if kind != "kernel" else contextlib.nullcontext():
            out = run(kind, wd)
    except Exception:
        import traceback
        out = {"exception": traceback.format_exc(), "logs": {
            f: open(os.path.join(wd, f)).read() for f in os.listdir(wd) if f.endswith(".log")}}
    print(json.dumps(out))
