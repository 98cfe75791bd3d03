"""The porter live on 127.0.0.1 (an ephemeral port): cold start, checkpoint after K invocations,
restored scale-out (visible in /stats), error paths (404, 400, 502 crash -> replaced, 504 hang
-> killed and replaced), keep-alive scale to zero, registration by API, the LLM and the C
worker through checkpoint/restore, and a SIGTERM that leaves no process behind (/proc)."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cxlfork ptrace)")
PY = sys.executable


class Porter:
    """A `cxlfork porter` process; every worker it starts carries env PORTER_TEST_TAG."""

    def __init__(self, tmp: str, functions: str, porter_extra: str = ""):
        self.tag = uuid.uuid4().hex
        self.store = tempfile.mkdtemp(prefix="porter-test-store-", dir="/dev/shm")
        self.cfg = os.path.join(tmp, "porter.toml")
        with open(self.cfg, "w") as f:
            f.write(f'[porter]\nport = 0\nstore = "{self.store}"\n{porter_extra}\n')
            f.write(functions.replace("@TAG@", self.tag))
        self.p = subprocess.Popen([PY, "-m", "cxlfork", "porter", "--config", self.cfg],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        if "listening on http://127.0.0.1:" not in line:      # the fixture never sees it
            shutil.rmtree(self.store, ignore_errors=True)
            raise AssertionError((line, self.p.stderr.read()))
        self.port = int(line.rsplit(":", 1)[1])
        self.seen: set[int] = set()

    def request(self, method: str, path: str, body=None, raw: bytes | None = None,
                timeout=90.0, headers: dict | None = None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        c.request(method, path, body=data,
                  headers=headers or {"Content-Type": "application/json"})
        r = c.getresponse()
        text = r.read()
        c.close()
        pid = r.getheader("X-Porter-Instance")
        if pid:
            self.seen.add(int(pid))
        ctype = r.getheader("Content-Type", "")
        return r.status, (json.loads(text) if "json" in ctype else text.decode()), r

    def invoke(self, fn: str, body, **kw):
        return self.request("POST", f"/functions/{fn}/invoke", body, **kw)

    def stats(self) -> dict:
        st = self.request("GET", "/stats")[1]
        for f in st["functions"].values():
            self.seen.update(i["pid"] for i in f["instance_list"])
        return st

    def wait_for(self, pred, timeout=60.0, what="condition"):
        t = time.monotonic()
        while time.monotonic() - t < timeout:
            st = self.stats()
            if pred(st):
                return st
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}: {json.dumps(st)[:2000]}")

    def tagged_pids(self) -> list[int]:
        """Live processes whose environment carries this porter's tag."""
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if f"PORTER_TEST_TAG={self.tag}".encode() in f.read():
                        out.append(int(d))
            except OSError:
                pass
        return out

    def stop(self) -> tuple[int, str]:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            _, err = self.p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            _, err = self.p.communicate()
            raise AssertionError("the porter did not stop within 30 s of SIGTERM")
        finally:
            for pid in self.tagged_pids():          # never leave anything behind a failure
                os.kill(pid, signal.SIGKILL)
        return self.p.returncode, err


def _gone(pid: int, timeout: float = 10.0) -> bool:
    """True once pid has exited and was reaped (the porter kills a reclaimed instance just
    after taking it off its list)."""
    t = time.monotonic()
    while _alive(pid):
        if time.monotonic() - t > timeout:
            return False
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


ECHO = """
[functions.echo]
command = ["python", "-m", "cxlfork.workers.echo"]
init = {{ ballast_mib = 8 }}
policy = "{policy}"
checkpoint_after = 3
timeout_s = 3
queue_timeout_s = 30
slo_ms = {slo}
env = {{ PORTER_TEST_TAG = "@TAG@" }}
"""


@pytest.fixture
def porter(tmp_path):
    made = []

    def make(functions, porter_extra=""):
        p = Porter(str(tmp_path), functions, porter_extra)
        made.append(p)
        return p
    yield make
    for p in made:
        p.stop()
        shutil.rmtree(p.store, ignore_errors=True)


def test_checkpoint_after_k_then_restored_scale_out_and_shutdown(porter):
    p = porter(ECHO.format(policy="mow", slo=1000))
    for i in range(3):
        code, out, r = p.invoke("echo", {"i": i})
        assert code == 200 and out["echo"] == {"i": i}
        assert r.getheader("X-Porter-Start") == ("cold" if i == 0 else "warm")
    st = p.wait_for(lambda s: s["functions"]["echo"]["checkpoint"]["image"], 60,
                    "the checkpoint after 3 invocations")
    f = st["functions"]["echo"]
    assert f["starts"] == {"cold": 1, "warm": 2, "restored": 0}
    assert f["checkpoint"]["taken_after_invocations"] == 3
    image = f["checkpoint"]["image"]
    assert os.path.isdir(image)
    # two requests at once: the warm instance takes one, a restored clone the other
    results = []

    def call():
        results.append(p.invoke("echo", {"sleep": 1.0}))
    ts = [threading.Thread(target=call) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert [c for c, _, _ in results] == [200, 200]
    starts = sorted(r.getheader("X-Porter-Start") for _, _, r in results)
    assert starts == ["restored", "warm"], starts
    st = p.wait_for(lambda s: any(i["kind"] == "restored" and i["shared_bytes"] > 0
                                  for i in s["functions"]["echo"]["instance_list"]), 10,
                    "a memory sample of the restored clone")
    f = st["functions"]["echo"]
    assert f["starts"]["restored"] == 1 and f["instances"] == 2 and not f["restore_failures"]
    rest = next(i for i in f["instance_list"] if i["kind"] == "restored")
    assert rest["policy"] == "mow"
    cold = next(i for i in f["instance_list"] if i["kind"] == "cold")
    # the mow clone maps its state (the 8 MiB ballast too) from the page store: it has the
    # pages it touched resident from the store, and far less local memory than the original
    assert cold["local_bytes"] >= 8 << 20, cold
    assert rest["shared_bytes"] > 0 and rest["local_bytes"] < cold["local_bytes"] - (6 << 20), \
        (rest, cold)
    # the restored clone keeps the interpreter state: its request counter continues
    code, out, _ = p.invoke("echo", {"sleep": 0})
    assert code == 200
    metrics = p.request("GET", "/metrics")[1]
    assert 'porter_policy{function="echo",policy="mow"} 1.0' in metrics
    assert 'porter_invocations_total{function="echo",start="restored"} 1.0' in metrics
    pids = set(p.seen)
    assert len(pids) == 2 and all(_alive(x) for x in pids)
    rc, err = p.stop()
    assert rc == 0, err
    assert not p.tagged_pids() and not any(_alive(x) for x in pids)
    assert not os.path.exists(image)
    assert not [n for n in os.listdir(p.store) if n.endswith(".pages")]


def test_errors_404_400_crash_502_hang_504(porter):
    p = porter(ECHO.format(policy="cold", slo=1000), "allow_register = true")
    code, out, _ = p.invoke("nope", {})
    assert code == 404 and out["error"].startswith("unknown function 'nope'")
    assert "\n" not in out["error"]
    code, out, _ = p.invoke("echo", None, raw=b"{not json")
    assert code == 400 and "not valid JSON" in out["error"]
    code, out, _ = p.request("GET", "/functions/echo/invoke")
    assert code == 405
    code, out, _ = p.invoke("echo", {"x": 1})
    assert code == 200
    first = out["pid"]
    # a worker that crashes mid-request: 502, and it is replaced
    code, out, _ = p.invoke("echo", {"crash": 3})
    assert code == 502 and "exited with status 3" in out["error"], out
    st = p.wait_for(lambda s: s["functions"]["echo"]["idle"] == 1, 60, "the replacement")
    assert st["functions"]["echo"]["errors"]["crash"] == 1
    assert not _alive(first)
    code, out, _ = p.invoke("echo", {"x": 2})
    assert code == 200 and out["pid"] != first
    # a worker that hangs past timeout_s (3 s): 504, killed, replaced
    hung = out["pid"]
    code, out, _ = p.invoke("echo", {"sleep": 60})
    assert code == 504 and "within 3 s" in out["error"], out
    assert not _alive(hung)
    p.wait_for(lambda s: s["functions"]["echo"]["idle"] == 1, 60, "the replacement")
    code, out, _ = p.invoke("echo", {"x": 3})
    assert code == 200 and out["pid"] not in (first, hung)
    # the function's own error: 500, the instance lives on
    p.request("POST", "/functions", {"name": "thumb", "command": ["python", "-m",
              "cxlfork.workers.thumbnail"], "policy": "cold",
              "env": {"PORTER_TEST_TAG": p.tag}})
    code, out, _ = p.invoke("thumb", {"width": 2})
    assert code == 500 and out["error"].startswith("function thumb: KeyError")
    code, out, _ = p.invoke("thumb", {"width": 8, "height": 6, "seed": 1, "size": [4, 3]})
    assert code == 200 and out["width"] == 4 and len(out["mean"]) == 3


def test_register_by_api_and_keepalive_scale_to_zero(porter):
    p = porter("", "allow_register = true")
    code, out, _ = p.request("POST", "/functions", {"name": "e", "command": ["python"],
                                                    "policy": "quick"})
    assert code == 400 and out["error"] == ("request:functions.e.policy: must be one of auto, "
                                            "mow, moa, moa-eager, hybrid, cold, got 'quick'")
    code, out, _ = p.request("POST", "/functions", {"name": "e", "command": [
        "python", "-m", "cxlfork.workers.echo"], "keepalive_s": 1, "policy": "cold",
        "env": {"PORTER_TEST_TAG": p.tag}})
    assert code == 201, out
    code, _, _ = p.request("POST", "/functions", {"name": "e", "command": ["python"]})
    assert code == 409
    code, out, _ = p.invoke("e", [1, 2])
    assert code == 200 and out["echo"] == [1, 2]
    pid = out["pid"]
    st = p.wait_for(lambda s: s["functions"]["e"]["instances"] == 0, 30, "scale to zero")
    assert st["functions"]["e"]["starts"]["cold"] == 1
    assert _gone(pid)
    code, out, r = p.invoke("e", 5)                  # and back up from zero
    assert code == 200 and r.getheader("X-Porter-Start") == "cold"


def test_llm_and_c_worker_restored_clones_answer_like_the_original(porter):
    from cxlfork.workers.build_c import build
    wc = build()
    fns = f"""
[functions.llm]
command = ["python", "-m", "cxlfork.workers.llm"]
policy = "moa"
checkpoint_after = 2
keepalive_s = 2
queue_timeout_s = 60
env = {{ PORTER_TEST_TAG = "@TAG@" }}

[functions.wc]
command = ["{wc}"]
policy = "moa-eager"
checkpoint_after = 2
keepalive_s = 2
queue_timeout_s = 60
env = {{ PORTER_TEST_TAG = "@TAG@" }}
"""
    p = porter(fns)
    prompt = {"prompt": "What is the capital of France?", "max_new_tokens": 8}
    ref = [p.invoke("llm", prompt)[1] for _ in range(2)]
    assert ref[0]["tokens"] == ref[1]["tokens"] and "Paris" in ref[0]["text"], ref
    code, out, _ = p.invoke("wc", "two words\nand more")
    assert code == 200 and out["words"] == 4 and out["lines"] == 1 and out["bytes"] == 18
    code, wc_ref, _ = p.invoke("wc", "two words\nand more")
    p.wait_for(lambda s: all(f["checkpoint"]["image"] for f in s["functions"].values()), 90,
               "both checkpoints")
    # both scale to zero after their checkpoints (keep-alive 2 s), then come back as restores
    p.wait_for(lambda s: all(f["instances"] == 0 for f in s["functions"].values()), 30,
               "scale to zero")
    code, out, r = p.invoke("llm", prompt)
    assert code == 200 and r.getheader("X-Porter-Start") == "restored", \
        p.stats()["functions"]["llm"]
    assert out["tokens"] == ref[0]["tokens"]                  # same model, same answer
    code, out, r = p.invoke("wc", "two words\nand more")
    assert code == 200 and out == wc_ref
    assert r.getheader("X-Porter-Start") == "restored", p.stats()["functions"]["wc"]
    st = p.stats()["functions"]
    assert st["llm"]["starts"]["restored"] == 1 and st["wc"]["starts"]["restored"] == 1
    assert not st["llm"]["restore_failures"] and not st["wc"]["restore_failures"]
    assert st["wc"]["instance_list"][0]["policy"] == "moa-eager"
    assert next(i for i in st["llm"]["instance_list"] if i["kind"] == "restored")["policy"] \
        == "moa"
    assert p.stats()["porter"]["lazy_moa"]["clones"] >= 1       # lazy moa served the clone


def test_auto_policy_switches_on_slo_and_metrics_show_it(porter):
    # an SLO no invocation can meet: after the checkpoint and 8 warm invocations the auto
    # policy steps from mow toward copying (hybrid)
    p = porter(ECHO.format(policy="auto", slo=0.001))
    for i in range(3):
        assert p.invoke("echo", i)[0] == 200
    p.wait_for(lambda s: s["functions"]["echo"]["checkpoint"]["image"], 60, "the checkpoint")
    assert p.stats()["functions"]["echo"]["policy"] == "mow"
    for i in range(8):
        assert p.invoke("echo", i)[0] == 200
    st = p.wait_for(lambda s: s["functions"]["echo"]["policy"] == "hybrid", 15,
                    "the switch to hybrid")
    sw = st["functions"]["echo"]["policy_switches"][0]
    assert sw["from"] == "mow" and sw["to"] == "hybrid" and "> SLO" in sw["reason"]
    metrics = p.request("GET", "/metrics")[1]
    assert 'porter_policy{function="echo",policy="hybrid"} 1.0' in metrics
    assert 'porter_policy{function="echo",policy="mow"} 0.0' in metrics
    assert 'porter_policy_switches_total{function="echo",to="hybrid"} 1.0' in metrics


def test_local_memory_limit_blocks_scale_out(porter):
    fns = ECHO.format(policy="cold", slo=1000).replace("ballast_mib = 8", "ballast_mib = 16") \
        .replace("queue_timeout_s = 30", "queue_timeout_s = 1")
    p = porter(fns, "local_memory_limit_mib = 36\npressure_keepalive_s = 30")
    assert p.invoke("echo", 0)[0] == 200
    p.wait_for(lambda s: s["porter"]["local_memory_bytes"] >= 16 << 20, 10, "a memory sample")
    res = []
    t = threading.Thread(target=lambda: res.append(p.invoke("echo", {"sleep": 2.5})))
    t.start()
    time.sleep(0.5)
    # the one instance is busy and a second (16+ MiB) does not fit under 36 MiB: 503
    code, out, _ = p.invoke("echo", {"x": 1})
    t.join()
    assert code == 503 and "local memory limit" in out["error"], out
    assert res[0][0] == 200
    st = p.stats()
    assert st["porter"]["local_memory_limit_bytes"] == 36 << 20
    assert st["functions"]["echo"]["starts"]["cold"] == 1


def test_refused_checkpoint_and_failed_cold_starts_are_reported(porter):
    # a worker holding a socket cxlfork cannot carry (netlink) cannot be checkpointed: the
    # function keeps cold starts, and /stats names the reason
    holds_socket = ('import socket; s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW); '
                    'from cxlfork.workers.echo import init, handle, serve; serve(init, handle)')
    fns = f"""
[functions.sock]
command = ["python", "-c", "{holds_socket}"]
policy = "mow"
checkpoint_after = 2
env = {{ PORTER_TEST_TAG = "@TAG@" }}

[functions.mute]
command = ["sleep", "100"]
init_timeout_s = 1
env = {{ PORTER_TEST_TAG = "@TAG@" }}

[functions.quits]
command = ["true"]
env = {{ PORTER_TEST_TAG = "@TAG@" }}
"""
    p = porter(fns)
    for i in range(2):
        assert p.invoke("sock", i)[0] == 200
    st = p.wait_for(lambda s: s["functions"]["sock"]["checkpoint"]["error"], 30,
                    "the refused checkpoint")
    assert "socket" in st["functions"]["sock"]["checkpoint"]["error"]
    code, out, _ = p.invoke("sock", 3)
    assert code == 200
    code, out, _ = p.invoke("mute", 1)
    assert code == 502 and "no answer to the init within 1 s" in out["error"], out
    code, out, _ = p.invoke("quits", 1)
    assert code == 502 and "cold start failed" in out["error"], out
    assert p.stats()["functions"]["mute"]["errors"]["cold_start_failed"] == 1


def test_sigint_with_a_request_in_flight_leaves_nothing(porter):
    p = porter(ECHO.format(policy="cold", slo=1000))
    assert p.invoke("echo", 1)[0] == 200
    res = []

    def call():
        try:
            res.append(p.invoke("echo", {"sleep": 2.5})[0])
        except (OSError, http.client.HTTPException) as e:   # the porter may exit first
            res.append(type(e).__name__)
    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.7)
    pids = set(p.seen) | set(p.tagged_pids())
    assert pids
    p.p.send_signal(signal.SIGINT)
    rc, err = p.stop()
    t.join(30)
    assert rc == 0, err
    assert res and res[0] in (503, "RemoteDisconnected", "ConnectionResetError"), res
    assert not p.tagged_pids() and not any(_alive(x) for x in pids)


def test_ghost_pool_clones_are_warm_ghosts_and_the_pool_is_closed(porter):
    p = porter(ECHO.format(policy="moa-eager", slo=1000), "ghost_pool = 2")
    for i in range(3):
        assert p.invoke("echo", i)[0] == 200
    st = p.wait_for(lambda s: s["functions"]["echo"]["ghosts"]
                    and s["functions"]["echo"]["ghosts"]["idle"] == 2, 30, "2 warm ghosts")
    g = st["functions"]["echo"]["ghosts"]
    assert g["warm"] and g["size"] == 2
    idle = set(g["idle_pids"])
    res = []
    t = threading.Thread(target=lambda: res.append(p.invoke("echo", {"sleep": 1.0})))
    t.start()
    time.sleep(0.3)
    code, out, r = p.invoke("echo", "x")
    t.join()
    assert code == 200 and r.getheader("X-Porter-Start") == "restored", out
    assert int(r.getheader("X-Porter-Instance")) in idle        # the clone is a ghost
    assert out["n"] == 4                                        # with the original's state
    st = p.wait_for(lambda s: s["functions"]["echo"]["ghosts"]["idle"] == 2, 30, "a refill")
    assert st["functions"]["echo"]["ghosts"]["taken"] == 1
    ghosts = set(st["functions"]["echo"]["ghosts"]["idle_pids"])
    t0 = time.monotonic()                                       # gauges: once a second
    while 'porter_ghosts{function="echo",state="idle"} 2.0' not in \
            p.request("GET", "/metrics")[1]:
        assert time.monotonic() - t0 < 10, "porter_ghosts never showed 2 idle ghosts"
        time.sleep(0.2)
    rc, err = p.stop()
    assert rc == 0, err
    assert not any(_alive(x) for x in ghosts | p.seen)


def test_ghost_prefault_records_the_first_request_profile(porter):
    """ghost_prefault: after a restored instance's first request the porter records what it
    wrote (cxlfork.firstreq) once, remakes its warm ghosts with it, and the later clones (from
    those ghosts) answer with the original's state."""
    p = porter(ECHO.format(policy="mow", slo=1000), "ghost_pool = 1\nghost_prefault = true")
    for i in range(3):
        assert p.invoke("echo", i)[0] == 200
    p.wait_for(lambda s: (s["functions"]["echo"]["ghosts"] or {}).get("idle") == 1, 30,
               "a warm ghost")
    for round_ in range(2):
        res = []
        t = threading.Thread(target=lambda: res.append(p.invoke("echo", {"sleep": 1.0})))
        t.start()
        time.sleep(0.3)
        code, out, r = p.invoke("echo", "x")           # a second instance: restored
        t.join()
        assert code == 200 and r.getheader("X-Porter-Start") == "restored", out
        assert out["n"] == 4, out                      # the checkpointed state
        if round_ == 0:
            st = p.wait_for(lambda s: "first_request_pages" in s["functions"]["echo"]
                            ["checkpoint"], 30, "the first-request profile")
            f = st["functions"]["echo"]
            assert f["first_request_profile"] and f["checkpoint"]["first_request_pages"] > 0
            assert os.path.exists(os.path.join(f["checkpoint"]["image"], "first.json"))
        p.wait_for(lambda s: s["functions"]["echo"]["ghosts"]["idle"] == 1, 30, "a refill")
        # make the next start a restore again: the idle instances go away
        for inst in p.stats()["functions"]["echo"]["instance_list"]:
            if inst["kind"] == "restored":
                os.kill(inst["pid"], signal.SIGKILL)
        p.wait_for(lambda s: all(i["kind"] == "cold" for i in
                                 s["functions"]["echo"]["instance_list"]), 30, "reaped")
    rc, err = p.stop()
    assert rc == 0, err
