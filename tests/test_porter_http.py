"""HTTP functions in the porter, live: an OpenWhisk-style action runtime written from the public
contract (tests/progs/ow_action.py, stdlib only) cold-started in a network namespace of its own
and served /init + /run through the porter; two instances side by side on port 8080; a
Knative-style server (protocol = "http") with the request forwarded as is; bad servers (never
listens, answers garbage, hangs mid-answer, /init fails) answered 502/504 with one line, the
instance killed, its namespace gone, the porter serving its other functions; nothing left
behind (processes, namespaces)."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

from test_porter_service import PY, Porter, _alive, _gone, porter  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, cxlfork ptrace)")
HERE = os.path.dirname(os.path.abspath(__file__))
OW = os.path.join(HERE, "progs", "ow_action.py")
BAD = os.path.join(HERE, "progs", "bad_http.py")

ACTION_CODE = '''
import os, time
def main(args):
    if "sleep" in args:
        time.sleep(args["sleep"])
    while "until" in args and not os.path.exists(args["until"]):   # a barrier for the tests
        time.sleep(0.01)
    if "fail" in args:
        raise ValueError(args["fail"])
    return {"greeting": "hello " + args.get("name", "stranger"), "pid": os.getpid(),
            "activation_id": os.environ["__OW_ACTIVATION_ID"],
            "deadline": os.environ["__OW_DEADLINE"],
            "action_name": os.environ["__OW_ACTION_NAME"], "flavour": os.environ["FLAVOUR"]}
'''


def ow_function(name="ow", policy="cold", extra=""):
    code = json.dumps(ACTION_CODE)
    return f"""
[functions.{name}]
command = ["python", "{OW}"]
protocol = "openwhisk"
init = {{ name = "{name}", main = "main", code = {code}, env = {{ FLAVOUR = "vanilla" }} }}
policy = "{policy}"
timeout_s = 20
init_timeout_s = 30
queue_timeout_s = 30
env = {{ PORTER_TEST_TAG = "@TAG@" }}
{extra}
"""


def ns_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def ns_in_use(ino: int) -> list[str]:
    """Who still holds network namespace `ino`: processes in it, and fds of nsfs or sockets
    naming it are not visible per socket, so: processes in it and open /proc/*/ns fds."""
    holders = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.stat(f"/proc/{d}/ns/net").st_ino == ino:
                holders.append(f"PID {d} is in it")
            for fd in os.listdir(f"/proc/{d}/fd"):
                if os.readlink(f"/proc/{d}/fd/{fd}") == f"net:[{ino}]":
                    holders.append(f"PID {d} fd {fd}")
        except OSError:
            pass
    return holders


def sockets_of(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


def test_openwhisk_action_cold_start_init_run_and_two_side_by_side(porter):
    p = porter(ow_function())
    code, out, r = p.invoke("ow", {"name": "porter"})
    assert code == 200, out
    assert r.getheader("X-Porter-Start") == "cold"
    assert out["greeting"] == "hello porter" and out["flavour"] == "vanilla"   # /init's env
    assert out["action_name"] == "/_/ow" and len(out["activation_id"]) == 32
    first = out["pid"]
    assert ns_of(first) != ns_of(os.getpid())
    # a warm request on the same instance: a new activation id
    code, out2, r = p.invoke("ow", {"name": "again"})
    assert code == 200 and r.getheader("X-Porter-Start") == "warm" and out2["pid"] == first
    assert out2["activation_id"] != out["activation_id"]
    # the action's own error: 500 with its message, the instance kept
    code, out3, _ = p.invoke("ow", {"fail": "no such thing"})
    assert code == 500 and "ValueError: no such thing" in out3["error"], out3
    # two at once: a second instance, also on port 8080, in another namespace
    res = []
    gate = os.path.join(p.store, "gate")          # the busy request returns once it exists
    t = threading.Thread(target=lambda: res.append(p.invoke("ow", {"until": gate})))
    t.start()
    st = p.wait_for(lambda s: s["functions"]["ow"]["busy"] == 1, 30, "the first one busy")
    code, out4, r = p.invoke("ow", {"name": "second"})
    open(gate, "w").close()
    t.join()
    assert code == 200 and r.getheader("X-Porter-Start") == "cold", out4
    assert res[0][0] == 200
    pids = {res[0][1]["pid"], out4["pid"]}
    assert len(pids) == 2 and first in pids
    a, b = sorted(pids)
    assert ns_of(a) != ns_of(b) and os.getpid() not in (a, b)
    st = p.stats()["functions"]["ow"]
    assert st["starts"] == {"cold": 2, "warm": 2, "restored": 0}, st["starts"]
    assert st["errors"] == {"function_error": 1}
    nss = [ns_of(a), ns_of(b)]
    rc, err = p.stop()
    assert rc == 0, err
    for pid in (a, b):
        assert _gone(pid)
    for ino in nss:
        assert not ns_in_use(ino)
    assert not p.tagged_pids()


def test_knative_style_http_function_gets_the_request_as_is(porter):
    p = porter(f"""
[functions.kn]
command = ["python", "{BAD}", "echo"]
protocol = "http"
policy = "cold"
env = {{ PORTER_TEST_TAG = "@TAG@" }}

[functions.kn2]
command = ["python", "{BAD}", "echo-idle-close"]
protocol = "http"
policy = "cold"
env = {{ PORTER_TEST_TAG = "@TAG@" }}
""" + ow_function())
    code, out, r = p.request("PUT", "/functions/kn/invoke/some/path?x=1&y=2", raw=b"raw \x00 bytes",
                             headers={"X-Custom": "yes", "Content-Type": "application/x-stuff"})
    assert code == 201, out
    assert r.getheader("X-Echo-Server") == "bad_http" and r.getheader("X-Porter-Start") == "cold"
    assert out["method"] == "PUT" and out["path"] == "/some/path?x=1&y=2"
    assert out["body"] == "raw \x00 bytes" and out["headers"]["X-Custom"] == "yes"
    assert out["headers"]["Content-Type"] == "application/x-stuff"
    assert out["port_env"] == "8080"
    code, out, r = p.request("GET", "/functions/kn/invoke")
    assert code == 201 and out["method"] == "GET" and out["path"] == "/" and out["body"] == ""
    assert r.getheader("X-Porter-Start") == "warm"
    code, out, r = p.request("DELETE", "/functions/kn/invoke?q=/a/b&r")
    assert code == 201 and out["method"] == "DELETE" and out["path"] == "/?q=/a/b&r", out
    code, out, r = p.request("GET", "/functions/kn/invoke/x/?")
    assert code == 201 and out["path"] == "/x/?", out
    code, _, _ = p.request("GET", "/functions/kn/invoked")
    assert code == 404
    assert p.request("GET", "/functions")[1]["kn"]["protocol"] == "http"
    # a server that closes idle kept-alive connections: the porter reconnects, still warm
    code, out, r = p.request("POST", "/functions/kn2/invoke/a", raw=b"1")
    assert code == 201 and r.getheader("X-Porter-Start") == "cold"
    pid = r.getheader("X-Porter-Instance")
    time.sleep(0.8)
    code, out, r = p.request("POST", "/functions/kn2/invoke/b", raw=b"2")
    assert code == 201 and out["path"] == "/b" and out["body"] == "2", out
    assert r.getheader("X-Porter-Start") == "warm" and r.getheader("X-Porter-Instance") == pid
    # an openwhisk function is still JSON-in JSON-out on POST only
    code, out, _ = p.request("GET", "/functions/ow/invoke")
    assert code == 405


BAD_FUNCS = """
[functions.{name}]
command = ["python", "{bad}", "{mode}"]
protocol = "{protocol}"
policy = "cold"
timeout_s = {timeout}
init_timeout_s = {init_timeout}
queue_timeout_s = 30
env = {{ PORTER_TEST_TAG = "@TAG@" }}
"""


def bad(name, mode, protocol="openwhisk", init_timeout=30, timeout=30):
    """(timeouts generous but where the test is about them: the machine is shared)"""
    return BAD_FUNCS.format(name=name, bad=BAD, mode=mode, protocol=protocol,
                            init_timeout=init_timeout, timeout=timeout)


def test_bad_http_workers_502_504_killed_namespace_gone_others_served(porter):
    p = porter(bad("deaf", "never-listen", init_timeout=2) + bad("garbage", "garbage-run")
               + bad("hang", "hang-run", timeout=2) + bad("dies", "die-run")
               + ow_function("badinit").replace('main = "main"', 'main = "nope"')
               + ow_function("quits").replace(f'command = ["python", "{OW}"]',
                                              'command = ["true"]')
               + ow_function())
    base_sockets = sockets_of(p.p.pid)
    # never listens: 502 naming the port and the timeout, the instance killed
    code, out, _ = p.invoke("deaf", {})
    assert code == 502 and "did not listen on 127.0.0.1:8080" in out["error"] \
        and "within 2 s" in out["error"], out
    assert "\n" not in out["error"]
    # /init fails: 502 with the action's message
    code, out, _ = p.invoke("badinit", {})
    assert code == 502 and "/init answered 502: the action has no function 'nope'" \
        in out["error"], out
    # a command that exits at once: 502, cold start failed
    code, out, _ = p.invoke("quits", {})
    assert code == 502 and "cold start failed" in out["error"], out
    # the porter keeps serving the good one meanwhile
    code, out, _ = p.invoke("ow", {"name": "x"})
    assert code == 200 and out["greeting"] == "hello x"
    for fn, status, text in (("garbage", 502, "not HTTP"), ("hang", 504, "within 2 s"),
                             ("dies", 502, "exited with status 7")):
        code, out, r = p.invoke(fn, {"n": 1})
        assert code == status and text in out["error"], (fn, out)
        assert "\n" not in out["error"]
        pid = int(out["error"].split("instance PID ")[1].split()[0])
        assert _gone(pid), fn
    st = p.stats()["functions"]
    assert st["deaf"]["errors"] == {"cold_start_failed": 1}
    assert st["badinit"]["errors"] == {"cold_start_failed": 1}
    assert st["hang"]["errors"]["timeout"] == 1
    assert st["garbage"]["errors"]["crash"] == 1
    # the replacements (garbage, hang, dies start new instances); then everything stops
    code, out, _ = p.invoke("ow", {"name": "y"})
    assert code == 200
    p.wait_for(lambda s: all(s["functions"][f]["idle"] == 1 and not s["functions"][f]["starting"]
                             for f in ("garbage", "hang", "dies")), 60, "the replacements")
    nss = set()
    for pid in p.tagged_pids():
        try:
            nss.add(ns_of(pid))
        except OSError:
            pass
    # no sockets into dead instances' namespaces linger in the porter: what it holds now is
    # its listener and a connection per live instance at most
    live = sum(f["instances"] for f in p.stats()["functions"].values())
    assert sockets_of(p.p.pid) <= base_sockets + live + 1
    rc, err = p.stop()
    assert rc == 0, err
    assert not p.tagged_pids()
    for ino in nss:
        assert not ns_in_use(ino), ino


EXAMPLES = os.path.join(os.path.dirname(HERE), "cxlfork", "porter", "examples")


def _example_functions(name: str, extra: str = "") -> str:
    """The [functions.*] part of an example config, tagged for the leftover check."""
    text = open(os.path.join(EXAMPLES, name)).read()
    return text[text.index("[functions."):] + f'env = {{ PORTER_TEST_TAG = "@TAG@" }}\n{extra}'


def _models_missing():
    try:
        from cxlfork.workers.models import minilm_files, smollm2_gguf
        import llama_cpp  # noqa: F401
        smollm2_gguf()
        minilm_files()
    except Exception as e:                 # noqa: BLE001 - the reason is the skip message
        return f"{type(e).__name__}: {e} (run `make .stamps/porter-workers`)"
    return None


def test_example_configs_are_valid_shipped_and_documented():
    """Every example config loads (stdio and OpenWhisk ones for the LLM and the embedder),
    is in setup.py's package_data (installed with the package) and named in docs/porter.md."""
    import ast
    import fnmatch
    from cxlfork.porter import config
    root = os.path.dirname(HERE)
    tree = ast.parse(open(os.path.join(root, "setup.py")).read())
    data = next(ast.literal_eval(k.value) for n in ast.walk(tree) if isinstance(n, ast.Call)
                for k in n.keywords if k.arg == "package_data")
    docs = open(os.path.join(root, "docs", "porter.md")).read()
    names = sorted(os.listdir(EXAMPLES))
    assert {"llm.toml", "embed.toml", "llm-openwhisk.toml", "embed-openwhisk.toml"} <= set(names)
    for name in names:
        c = config.load(os.path.join(EXAMPLES, name))
        want = "openwhisk" if "openwhisk" in name else "stdio"
        assert [f.protocol for f in c.functions.values()] == [want], name
        assert any(fnmatch.fnmatch(f"examples/{name}", pat)
                   for pat in data.get("cxlfork.porter", [])), f"{name} not in package_data"
        assert name in docs, f"{name} not in docs/porter.md"


@pytest.mark.skipif(_models_missing() is not None, reason=str(_models_missing()))
def test_llm_and_embedder_as_openwhisk_actions(porter):
    p = porter(_example_functions("llm-openwhisk.toml")
               + _example_functions("embed-openwhisk.toml")
               + """
[functions.nomodel]
command = ["python", "-m", "cxlfork.workers.http_action", "cxlfork.workers.llm"]
protocol = "openwhisk"
init = { model = "/nonexistent/x.gguf" }
policy = "cold"
env = { PORTER_TEST_TAG = "@TAG@" }
""")
    code, out, r = p.invoke("llm", {"prompt": "What is the capital of France?",
                                    "max_new_tokens": 16})
    assert code == 200, out
    assert "Paris" in out["text"] and r.getheader("X-Porter-Start") == "cold"
    code, out2, r = p.invoke("llm", {"prompt": "What is the capital of France?",
                                     "max_new_tokens": 16})
    assert code == 200 and out2["tokens"] == out["tokens"]
    assert r.getheader("X-Porter-Start") == "warm"
    code, out, _ = p.invoke("llm", {"prompt": 3})
    assert code == 500 and "input must be" in out["error"]
    texts = ["How do I bake bread at home?", "What is the recipe for homemade bread?",
             "The stock market fell sharply today.", "Cats sleep most of the day."]
    code, out, _ = p.invoke("embed", {"texts": texts})
    assert code == 200, out
    e = out["embeddings"]
    sims = [sum(a * b for a, b in zip(e[0], x)) for x in e[1:]]
    assert sims[0] > 0.6 and max(sims[1:]) < 0.2, sims
    # a missing model: 502 with the line naming it, and the others keep being served
    code, out, _ = p.invoke("nomodel", {"prompt": "x"})
    assert code == 502 and "/init answered 502: init: ModelError: model file " \
        "/nonexistent/x.gguf" in out["error"], out
    assert p.invoke("embed", {"texts": ["still here"]})[0] == 200
    rc, err = p.stop()
    assert rc == 0, err
    assert not p.tagged_pids()


def _no_inet_checkpoint():
    import importlib.util
    if importlib.util.find_spec("cxlfork.state.inet") is None:
        return "this cxlfork does not checkpoint TCP sockets into per-clone namespaces yet"
    return None


@pytest.mark.skipif(_no_inet_checkpoint() is not None, reason=str(_no_inet_checkpoint()))
@pytest.mark.parametrize("ghosts", [0, 2])
def test_openwhisk_action_checkpointed_and_served_by_restored_clones(porter, ghosts):
    """After K invocations the cold instance is checkpointed (listener and all); later
    instances are cxlfork clones (spawned restorers, or warm ghosts of the pool), each in a
    network namespace of its own with the listener made again there, serving /run without a
    new /init (the action's state comes with the checkpoint)."""
    p = porter(ow_function(policy="mow", extra="checkpoint_after = 3\nmax_instances = 3"),
               f"ghost_pool = {ghosts}")
    for i in range(3):
        code, out, r = p.invoke("ow", {"name": str(i)})
        assert code == 200, out
    original = out["pid"]
    st = p.wait_for(lambda s: s["functions"]["ow"]["checkpoint"]["image"]
                    or s["functions"]["ow"]["checkpoint"]["error"], 60, "the checkpoint")
    assert st["functions"]["ow"]["checkpoint"]["error"] is None, st["functions"]["ow"]
    ghost_pids = set()
    if ghosts:
        st = p.wait_for(lambda s: (s["functions"]["ow"]["ghosts"] or {}).get("idle") == ghosts,
                        30, "the warm ghosts")
        ghost_pids = set(st["functions"]["ow"]["ghosts"]["idle_pids"])
    # two requests at once: the original serves one, a restored clone the other
    res = []
    gate = os.path.join(p.store, "gate")          # both return once both are in flight
    ts = [threading.Thread(target=lambda: res.append(p.invoke("ow", {"until": gate})))
          for _ in range(2)]
    for t in ts:
        t.start()
    p.wait_for(lambda s: s["functions"]["ow"]["busy"] == 2, 30, "two requests in flight")
    open(gate, "w").close()
    for t in ts:
        t.join()
    kinds = sorted(r.getheader("X-Porter-Start") for _, _, r in res)
    assert [c for c, _, _ in res] == [200, 200], res
    assert "restored" in kinds, kinds
    clones = [o["pid"] for _, o, r in res if r.getheader("X-Porter-Start") == "restored"]
    for c in clones:
        assert c != original and ns_of(c) not in (ns_of(original), ns_of(os.getpid()))
        if ghosts:
            assert c in ghost_pids, (c, ghost_pids)
    # the clone answers warm requests with its own activation ids, the init state carried over
    f = p.stats()["functions"]["ow"]
    assert f["starts"]["restored"] >= 1 and f["starts"]["cold"] == 1, f["starts"]
    assert not f["restore_failures"], f["restore_failures"]
    seen = {o["pid"] for _, o, _ in res}
    for _ in range(4):
        code, out, _ = p.invoke("ow", {"name": "later"})
        assert code == 200 and out["greeting"] == "hello later" and out["flavour"] == "vanilla"
        seen.add(out["pid"])
    nss = {ns_of(pid) for pid in seen if _alive(pid)}
    rc, err = p.stop()
    assert rc == 0, err
    assert not p.tagged_pids()
    for ino in nss:
        assert not ns_in_use(ino), ino


@pytest.mark.skipif(_no_inet_checkpoint() is not None or _models_missing() is not None,
                    reason=str(_no_inet_checkpoint() or _models_missing()))
def test_llm_action_restored_clone_answers_like_the_original(porter):
    """The LLM as an OpenWhisk action (http_action), checkpointed after K = 2: a restored clone
    in its own namespace generates the warm original's tokens for the same request."""
    p = porter(_example_functions("llm-openwhisk.toml").replace(
        'policy = "cold"', 'policy = "mow"\ncheckpoint_after = 2'))
    req = {"prompt": "What is the capital of France?", "max_new_tokens": 16}
    outs = [p.invoke("llm", req) for _ in range(2)]
    assert all(c == 200 for c, _, _ in outs), outs
    p.wait_for(lambda s: s["functions"]["llm"]["checkpoint"]["image"]
               or s["functions"]["llm"]["checkpoint"]["error"], 120, "the checkpoint")
    res = []
    ts = [threading.Thread(target=lambda: res.append(p.invoke("llm", req))) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    kinds = sorted(r.getheader("X-Porter-Start") for _, _, r in res)
    assert kinds == ["restored", "warm"], (kinds, [o for _, o, _ in res])
    for code, out, _ in res:
        assert code == 200 and out["tokens"] == outs[0][1]["tokens"], out
    assert "Paris" in res[0][1]["text"]
    rc, err = p.stop()
    assert rc == 0, err
    assert not p.tagged_pids()


@pytest.mark.parametrize("policy", ["cold", "mow"])
def test_http_instances_die_with_a_sigkilled_porter(porter, policy):
    """An HTTP server has no stdin pipe to see EOF on: a cold instance carries
    PR_SET_PDEATHSIG = SIGKILL from the porter's spawner thread, a restored clone is held by
    the porter's lifeline watcher: SIGKILL the porter and its instances and their namespaces
    go too."""
    import signal
    if policy != "cold" and _no_inet_checkpoint():
        pytest.skip(_no_inet_checkpoint())
    p = porter(ow_function(policy=policy, extra="max_instances = 2\ncheckpoint_after = 1"))
    if policy != "cold":
        assert p.invoke("ow", {"name": "first"})[0] == 200
        p.wait_for(lambda s: s["functions"]["ow"]["checkpoint"]["image"], 60, "the checkpoint")
    res = []
    gate = os.path.join(p.store, "gate")
    t = threading.Thread(target=lambda: res.append(p.invoke("ow", {"until": gate})))
    t.start()
    p.wait_for(lambda s: s["functions"]["ow"]["busy"] == 1, 30, "the first one busy")
    assert p.invoke("ow", {"name": "a"})[0] == 200
    open(gate, "w").close()
    t.join()
    pids = p.tagged_pids()
    assert len(pids) == 2, pids
    kinds = sorted(i["kind"] for i in p.stats()["functions"]["ow"]["instance_list"])
    assert kinds == (["cold", "cold"] if policy == "cold" else ["cold", "restored"]), kinds
    nss = [ns_of(pid) for pid in pids]
    p.p.send_signal(signal.SIGKILL)
    p.p.wait()
    deadline = time.monotonic() + 10
    while p.tagged_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not p.tagged_pids()
    for ino in nss:
        assert not ns_in_use(ino), ino
