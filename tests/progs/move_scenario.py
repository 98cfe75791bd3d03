"""Runs inside the emulated CXL machine: a worker whose pages start on the slow node is
moved with the real `tiermem` CLI; prints one JSON object with what each step saw.

Scenarios: 'promote' (node 1 -> node 0 by range, numastat before/after, data verified) and
'full' (fill node 1 with a hog, then move a worker onto it: clear error, data verified)."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable


def tiermem(*args):
    r = subprocess.run([PY, "-m", "tiermem.cli", *map(str, args)], capture_output=True,
                       text=True)
    return {"rc": r.returncode, "out": r.stdout, "err": r.stderr}


def start_worker(mb, node):
    p = subprocess.Popen([PY, os.path.join(HERE, "pattern_worker.py"), str(mb), str(node)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return p, json.loads(p.stdout.readline())


def verify(p):
    p.stdin.write("verify\n")
    p.stdin.flush()
    return p.stdout.readline().strip()


def pages_on(numastat_json, info):
    d = json.loads(numastat_json)
    out = {}
    for v in d["vmas"]:
        if int(v["start"], 16) <= info["start"] < int(v["end"], 16):
            out = {int(k): c for k, c in v["pages"].items()}
    return out


def promote():
    p, info = start_worker(64, 1)
    res = {"info": info}
    res["before"] = pages_on(tiermem("numastat", info["pid"], "--json")["out"], info)
    half = info["start"] + (info["end"] - info["start"]) // 2
    mv = tiermem("move", info["pid"], "--to", 0, "--range", f"{info['start']:#x}-{half:#x}",
                 "--json")
    res["move"] = json.loads(mv["out"]) if mv["rc"] == 0 else mv
    res["after"] = pages_on(tiermem("numastat", info["pid"], "--json")["out"], info)
    res["verify"] = verify(p)
    capped = tiermem("move", info["pid"], "--to", 0, "--range", f"{half:#x}-{info['end']:#x}",
                     "--max-mb", 4, "--json")
    res["capped"] = json.loads(capped["out"]) if capped["rc"] == 0 else capped
    res["verify2"] = verify(p)
    res["absent"] = tiermem("move", info["pid"], "--to", 7)
    p.stdin.write("exit\n"); p.stdin.flush(); p.wait()
    return res


def start_hog(mb, node):
    """Fill node with mb MiB (C memset through tiermem.native: fast even under TCG)."""
    code = ("import sys; from tiermem import native; "
            f"b = native.NodeBuffer({mb} << 20, {node}); print('ready', flush=True); "
            "sys.stdin.readline()")
    p = subprocess.Popen([PY, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def full():
    # Room on node 1 = free pages + page cache the kernel reclaims for a migration (earlier
    # tests leave file pages there; counting MemFree alone left the move enough room).
    mi = {}
    for line in open("/sys/devices/system/node/node1/meminfo"):
        f = line.split()
        mi[f[2].rstrip(":")] = int(f[3])
    room_kb = mi["MemFree"] + mi["Active(file)"] + mi["Inactive(file)"]
    hog_mb = max(16, room_kb // 1024 - 64)   # leave node 1 just above its min watermark
    hog = start_hog(hog_mb, 1)
    p, info = start_worker(128, 0)
    res = {"hog_mb": hog_mb, "info": info}
    res["move"] = tiermem("move", info["pid"], "--to", 1)
    res["verify"] = verify(p)
    res["hog_alive"] = hog.poll() is None
    for q in (p, hog):
        q.stdin.write("exit\n"); q.stdin.flush(); q.wait()
    return res


if __name__ == "__main__":
    print(json.dumps({"promote": promote, "full": full}[sys.argv[1]]()))
