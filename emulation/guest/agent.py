"""Guest agent of the emulated CXL machine: runs commands sent by the host over virtio-serial.

Runs inside the guest (chroot on the host's root, host's /usr/bin/python3, stdlib only).
Protocol: one JSON object per line each way, on the virtio-serial port named
`tiermem.agent`. Requests carry an "id" echoed in the answer; each runs in its own thread
so several commands may run at once.

  {"id", "op": "ping"}                      -> {"id", "ok": true, "uptime_s", "pid"}
  {"id", "op": "run", "argv" | "shell", "timeout", "cwd", "env", "input"}
      -> {"id", "ok": true, "returncode", "stdout", "stderr", "timed_out", "duration_s"}
  {"id", "op": "poweroff"}                  -> {"id", "ok": true}, then the guest powers off
Errors (bad request, command not found, ...) answer {"id", "ok": false, "error": "..."}.
"""
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time

PORT_NAME = "tiermem.agent"
_write_lock = threading.Lock()


def find_port():
    base = "/sys/class/virtio-ports"
    for _ in range(200):
        for d in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            try:
                with open(os.path.join(base, d, "name")) as f:
                    if f.read().strip() == PORT_NAME:
                        return "/dev/" + d
            except OSError:
                pass
        time.sleep(0.05)
    raise SystemExit(f"tiermem-agent: no virtio-serial port named {PORT_NAME}")


def send(fd, obj):
    data = (json.dumps(obj) + "\n").encode()
    with _write_lock:
        while data:
            n = os.write(fd, data)
            data = data[n:]


def run_command(req):
    timeout = float(req.get("timeout") or 3600)
    env = dict(os.environ)
    env.update(req.get("env") or {})
    if "shell" in req:
        argv, shell = req["shell"], True
    else:
        argv, shell = list(req["argv"]), False
    inp = req.get("input")
    t0 = time.monotonic()
    try:
        p = subprocess.Popen(argv, shell=shell, cwd=req.get("cwd") or "/", env=env,
                             stdin=subprocess.PIPE if inp is not None else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    except OSError as e:
        return {"ok": False, "error": f"cannot run {argv if shell else argv[0]!r} in the guest: "
                                      f"{e.strerror}"}
    timed_out = False
    try:
        out, err = p.communicate(inp.encode() if inp is not None else None, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            out, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a child left its own session and kept the pipes
            p.kill()
            out, err = b"", b"(output lost: a process outside the command's group kept it open)"
    return {"ok": True, "returncode": p.wait(), "timed_out": timed_out,
            "stdout": out.decode(errors="replace"), "stderr": err.decode(errors="replace"),
            "duration_s": time.monotonic() - t0}


def poweroff():
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF


def handle(fd, req):
    rid = req.get("id")
    op = req.get("op")
    try:
        if op == "ping":
            with open("/proc/uptime") as f:
                up = float(f.read().split()[0])
            ans = {"ok": True, "uptime_s": up, "pid": os.getpid()}
        elif op == "run":
            ans = run_command(req)
        elif op == "poweroff":
            send(fd, {"id": rid, "ok": True})
            time.sleep(0.2)
            poweroff()
            return
        else:
            ans = {"ok": False, "error": f"unknown op {op!r}"}
    except Exception as e:  # the agent must answer every request, whatever went wrong
        ans = {"ok": False, "error": f"agent: {type(e).__name__}: {e}"}
    ans["id"] = rid
    send(fd, ans)


def main():
    fd = os.open(find_port(), os.O_RDWR)
    buf = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:  # host side not connected: the port reads EOF until it is
            buf = b""
            time.sleep(0.05)
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                req = json.loads(line)
            except ValueError:
                continue  # a partial line left by a host that disconnected mid-write
            threading.Thread(target=handle, args=(fd, req), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
