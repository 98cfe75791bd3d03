"""Drives tiermemd end to end inside the emulated CXL machine and prints one JSON result.

    daemon_scenario.py promote WORKDIR POLICY     hot set on the slow node, tiermemd promotes
    daemon_scenario.py faults  WORKDIR            exits/forks/execs, raising policy, missing
                                                  sampler, full fast tier, kill -9 + restart
Used by tests/test_daemon_vm.py (assertions there) and bench/bench_daemon.py.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

PY = sys.executable
HERE = os.path.dirname(os.path.abspath(__file__))
DAMON = "/sys/kernel/mm/damon/admin/kdamonds"


class Workload:
    def __init__(self, total_mb, hot_mb, node, tag=""):
        self.p = subprocess.Popen([PY, "-m", "tiermemd.workload", str(total_mb), str(hot_mb),
                                   str(node), tag],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.p.stdout.readline())
        self.pid = self.info["pid"]

    def ask(self, cmd):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def where(self):
        return json.loads(self.ask("where"))

    def hot_fast_share(self):
        h = self.where()["hot"]
        return h.get("0", 0) / max(1, sum(h.values()))

    def close(self):
        if self.p.poll() is None:
            try:
                self.ask("exit")
            except (BrokenPipeError, OSError):
                pass
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()


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
        """One control request over the socket (tiermemd.control.request, what `tiermem
        ctl` uses; the CLI itself is exercised by the host tests: starting it costs tens of
        seconds under TCG)."""
        from tiermem.errors import TiermemError
        from tiermemd.control import request
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


def promote(wd, policy, limit_s=120, total=192, hot=48):
    w = Workload(total, hot, 1)
    params = {"m5": "top_k = 16384\nhot_min = 1.0", "damon": "", "tpp": ""}.get(policy, "")
    cfg = write_config(wd, f"""[[targets]]
name = "w"
cmdline = "tiermemd.workload {total} {hot} 1"
sampler = "damon"
policy = "{policy}"
[targets.sampler_params]
sample_us = 5000
aggr_us = 100000
[targets.policy_params]
{params}
""")
    d = Daemon(wd, cfg)
    res = {"info": w.info, "series": [], "t90": None}
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < limit_s and d.p.poll() is None:
            s = w.hot_fast_share()
            t = time.monotonic() - t0
            res["series"].append([round(t, 2), round(s, 4)])
            if s >= 0.9 and res["t90"] is None:
                res["t90"] = round(t, 2)
                break
            time.sleep(2)
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
        res["policy_switch"] = d.ctl("policy", target="w", policy="tpp")
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
        res["log"] = d.text()
        w.close()
    return res


def kernel(wd, limit_s=120, total=192, hot=48):
    """The kernel's own tiering on the same workload: NUMA balancing in memory-tiering mode
    (numa_balancing=2) with demotion on; no tiermemd."""
    knobs = {"/proc/sys/kernel/numa_balancing": "2",
             "/sys/kernel/mm/numa/demotion_enabled": "true"}
    old = {k: open(k).read().strip() for k in knobs}
    res = {"series": [], "t90": None, "knobs_before": old}
    try:
        for k, v in knobs.items():
            with open(k, "w") as f:
                f.write(v)
        w = Workload(total, hot, 1)
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < limit_s:
                s = w.hot_fast_share()
                t = time.monotonic() - t0
                res["series"].append([round(t, 2), round(s, 4)])
                if s >= 0.9 and res["t90"] is None:
                    res["t90"] = round(t, 2)
                    break
                time.sleep(2)
            res["where"] = w.where()
            res["verify"] = w.ask("verify")
        finally:
            w.close()
    finally:
        for k, v in old.items():
            with open(k, "w") as f:
                f.write(v)
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
from tiermem.policies.base import Policy
class Boom(Policy):
    name = "boom"
    params = {}
    def observe(self, batch):
        pass
    def plan(self, placement, capacity, budget):
        raise RuntimeError("deliberate failure in plan")
'''


def faults(wd):
    res = {}
    with open(os.path.join(wd, "boom.py"), "w") as f:
        f.write(FAILING_POLICY)
    with open(os.path.join(wd, "promote_all.py"), "w") as f:
        f.write(PROMOTE_ALL_POLICY)
    ws = {"exits": Workload(16, 4, 1, "exits"), "dmn": Workload(16, 4, 1, "dmn"),
          "raises": Workload(16, 4, 1, "raises"), "nosampler": Workload(16, 4, 1, "nosampler"),
          "good": Workload(160, 4, 1, "good")}
    # fill the fast node, leaving 112 MiB, so promoting 'good' runs into ENOMEM
    free_kb = int([ln.split()[3] for ln in open("/sys/devices/system/node/node0/meminfo")
                   if "MemFree" in ln][0])
    res["hog_mb"] = max(64, free_kb // 1024 - 112)
    hog = Workload(res["hog_mb"], 1, 0, "hog")
    go = os.path.join(wd, "exec-now")
    if os.path.exists(go):
        os.unlink(go)
    execer = subprocess.Popen(["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.2; done; "
                                           "exec sleep 600"])
    targets = ""
    for name, smp, pol in (("exits", "damon", "m5"), ("dmn", "damon", "m5"),
                           ("raises", "none", "boom"), ("nosampler", "idle", "m5"),
                           ("good", "none", "promote-all")):
        targets += f"""[[targets]]
name = "{name}"
cmdline = "tiermemd.workload .* {name}$"
sampler = "{smp}"
policy = "{pol}"
""" + ('policy_file = "boom.py"\n' if pol == "boom" else "") \
            + ('policy_file = "promote_all.py"\n' if pol == "promote-all" else "")
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
        res["verify"]["hog"] = hog.ask("verify")
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
        for w in list(ws.values()) + [hog]:
            w.close()
    return res


if __name__ == "__main__":
    kind, wd = sys.argv[1], sys.argv[2]
    os.makedirs(wd, exist_ok=True)
    try:
        if kind == "promote":
            out = promote(wd, sys.argv[3] if len(sys.argv) > 3 else "m5",
                          *(int(x) for x in sys.argv[4:]))
        elif kind == "kernel":
            out = kernel(wd, *(int(x) for x in sys.argv[3:]))
        elif kind == "cpu":
            out = cpu(wd, *(int(x) for x in sys.argv[3:5]),
                      *(sys.argv[5:6]), *(int(x) for x in sys.argv[6:]))
        else:
            out = faults(wd)
    except Exception as e:
        import traceback
        out = {"exception": traceback.format_exc(), "logs": {
            f: open(os.path.join(wd, f)).read() for f in os.listdir(wd) if f.endswith(".log")}}
    print(json.dumps(out))
