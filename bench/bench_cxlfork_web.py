"""cxlfork "servers" table, more rows: nginx (one process), the Node.js app of
tests/cxlfork_progs/node_counter.js (a 1M-element array built at start) and, with --llama,
llama-cpp-python's server (`python -m llama_cpp.server`, SmolLM2-135M, `--use_mlock false`,
restored with `--pidns new`: asyncio's loop is tied to getpid()). Each server is started,
warmed (nginx: a file served; Node: its threadpool used; llama: one completion) and
checkpointed (killed, freeing its port); then the time from the start of a restore to the
first answered request (nginx: a file, checked; Node: its state, checked; llama: /v1/models),
the clone in a new network namespace of its own, as a one-shot `cxlfork.restore.restore()`
and as a `prepare_restore()`d mow restore, next to a cold start of the same command to its
first answered request in our namespace. Measured in the same run, alternating, medians of
--runs.
Run as root:  .venv/bin/python bench/bench_cxlfork_web.py [--runs 5] [--llama]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from cxlfork.checkpoint import checkpoint  # noqa: E402
from cxlfork.restore import prepare_restore, restore  # noqa: E402
from cxlfork.state import netns  # noqa: E402

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NODE = shutil.which("node") or shutil.which("nodejs") or "/usr/bin/node"
NODE_APP = os.path.join(ROOT, "tests", "cxlfork_progs", "node_counter.js")
BODY = b"<p>hello from the checkpoint</p>\n"


def request(pid: int | None, port: int, path: str, deadline_s: float = 120.0) -> bytes:
    """GET path over HTTP/1.0 from 127.0.0.1:port in PID's namespace (None: ours), retrying
    until something answers 200; the body."""
    t_end = time.monotonic() + deadline_s
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=deadline_s) \
                if pid is None else netns.connect(pid, ("127.0.0.1", port), timeout=deadline_s)
            with s:
                s.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(1 << 16):
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            if b" 200 " not in head.split(b"\r\n")[0]:
                raise RuntimeError(f"bad answer {head[:80]!r}")
            return body
        except (ConnectionRefusedError, ConnectionResetError):
            if time.monotonic() > t_end:
                raise
            time.sleep(0.0005)


def _free_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def _nginx(work: str, port: int):
    www = os.path.join(work, "www")
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "index.html"), "wb") as f:
        f.write(BODY)
    tmp = os.path.join(work, "ngx-tmp")
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write("daemon off;\nmaster_process off;\nworker_processes 1;\n"
                f"error_log {work}/nginx.err;\npid {work}/nginx.pid;\n"
                "events { worker_connections 128; }\nhttp {\n  access_log off;\n" +
                "".join(f"  {k}_temp_path {tmp};\n" for k in
                        ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")) +
                f"  server {{ listen 127.0.0.1:{port}; root {www}; }}\n}}\n")

    def check(body: bytes) -> None:
        assert body == BODY, body[:80]
    return [NGINX, "-c", conf, "-p", work], "/index.html", "/index.html", check


def _node(work: str, port: int):
    def check(body: bytes) -> None:
        st = json.loads(body)
        assert (st["len"], st["sum"]) == (1 << 20, 523761200), st
    return [NODE, NODE_APP, str(port)], "/pool", "/", check


def _llama(work: str, port: int):
    from cxlfork.workers.models import smollm2_gguf
    model = smollm2_gguf()

    def check(body: bytes) -> None:
        assert json.loads(body)["data"][0]["id"] == model
    return ([sys.executable, "-m", "llama_cpp.server", "--model", model, "--host",
             "127.0.0.1", "--port", str(port), "--n_ctx", "256", "--n_threads", "1",
             "--use_mlock", "false"], "/v1/models", "/v1/models", check)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def row(name: str, make, runs: int, pidns: str = "host", log=print) -> tuple:
    work = tempfile.mkdtemp(prefix=f"cxlfork-bench-{name}-")
    store = tempfile.mkdtemp(prefix=f"cxlfork-bench-{name}-store-", dir="/dev/shm")
    port = _free_port()
    argv, warm, path, check = make(work, port)
    null = os.open("/dev/null", os.O_RDWR)
    stdio = (null, null, null)
    img = os.path.join(work, "img")
    keys = ("mow", "pmow", "cold")
    t: dict[str, list[float]] = {k: [] for k in keys}
    try:
        orig = subprocess.Popen(argv, cwd=work, stdin=null, stdout=null, stderr=null,
                                close_fds=True)
        request(None, port, warm)
        check(request(None, port, path))
        s = checkpoint(orig.pid, img, store, kill=True)
        orig.wait()
        with prepare_restore(img) as prep:
            for i in range(runs):
                log(f"... {name} run {i + 1}/{runs}")
                for key in keys:
                    t0 = time.perf_counter()
                    if key == "cold":
                        p = subprocess.Popen(argv, cwd=work, stdin=null, stdout=null,
                                             stderr=null, close_fds=True)
                        pid = p.pid
                        check(request(None, port, path))
                    else:
                        pid = (restore(img, stdio=stdio, pidns=pidns) if key == "mow" else
                               prep.restore(1, stdio=stdio, pidns=pidns))[0]
                        check(request(pid, port, path))
                    t[key].append(time.perf_counter() - t0)
                    _kill(pid)
    finally:
        os.close(null)
        subprocess.run([sys.executable, "-m", "cxlfork", "rm", img], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
    m = {k: statistics.median(v) for k, v in t.items()}
    return (name, f"{s['bytes'] / 2**20:.1f} MiB", f"{s['total_s'] * 1e3:.0f} ms",
            *(f"{m[k] * 1e3:.2f} ms" for k in keys), f"{m['cold'] / m['pmow']:.1f}x")


def run(runs: int = 5, llama: bool = False, log=lambda m: print(m, file=sys.stderr,
                                                               flush=True)) -> str:
    rows = []
    if os.path.exists(NGINX):
        rows.append(row("nginx", _nginx, runs, log=log))
    if os.path.exists(NODE):
        rows.append(row("node", _node, runs, log=log))
    if llama:
        rows.append(row("llama.server", _llama, runs, pidns="new", log=log))
    hdr = ("server", "stored", "checkpoint", "mow (API)", "mow (prep)", "cold start",
           "cold/mow (prep)")
    return (f"\nservers: restore start -> first answered request, each clone in a new network "
            f"namespace (llama.server also a new PID namespace); medians of {runs}, "
            f"alternating; load average {os.getloadavg()[0]:.1f}; kernel "
            f"{os.uname().release}\n" + " | ".join(f"{h:>15s}" for h in hdr) + "\n" +
            "\n".join(" | ".join(f"{v:>15s}" for v in r) for r in rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--llama", action="store_true", help="also llama-cpp-python's server "
                    "(its cold start loads the model: ~10-20 s a run here)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_cxlfork_web: run as root (ptrace, namespaces)")
    print(run(a.runs, a.llama))


if __name__ == "__main__":
    main()
