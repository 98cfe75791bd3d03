"""A Python worker with numpy state, for the cxlfork tests and benchmark.

argv[1] = MiB of initialised state (a numpy array). Prints "ready", then per stdin line:
"ping" -> "pong"; "go" -> checks its state and the interpreter ("ok"/"FAIL ...") and exits;
"touch F" -> writes fraction F of the array's pages (a write-heavy clone), answers "done";
"read" -> reads the whole array, answers "done"; "fork" -> os.fork(), the child answers "pong";
"blas" -> a 256x256 matrix product (big enough for OpenBLAS to use its threads) checked against
the one computed at start, answers "ok"/"FAIL".
"""
import os
import sys

import numpy as np

mib = int(sys.argv[1]) if len(sys.argv) > 1 else 16
state = (np.arange(mib * 2**20 // 8, dtype=np.uint64) * np.uint64(2654435761)) ^ np.uint64(7)
want = int(np.bitwise_xor.reduce(state))
words = {f"k{i}": i * i for i in range(10000)}
mat = (np.arange(256 * 256, dtype=np.float64).reshape(256, 256) % 7) - 3
prod_sum = float((mat @ mat.T).sum())
sys.stdout.write("ready\n")
sys.stdout.flush()
for line in sys.stdin:
    cmd = line.split()
    if not cmd:
        continue
    if cmd[0] == "ping":
        print("pong", flush=True)
    elif cmd[0] == "fork":              # the os.fork() baseline: the child answers
        if os.fork() == 0:
            print("pong", flush=True)
            os._exit(0)
        os.wait()
    elif cmd[0] == "blas":
        print("ok" if float((mat @ mat.T).sum()) == prod_sum else "FAIL blas", flush=True)
    elif cmd[0] == "read":              # read the whole state (a read-mostly request)
        int(np.bitwise_xor.reduce(state))
        print("done", flush=True)
    elif cmd[0] == "touch":
        n = int(len(state) * float(cmd[1]))
        state[:n:512] += np.uint64(1)
        print("done", flush=True)
    elif cmd[0] == "go":
        bad = []
        if int(np.bitwise_xor.reduce(state)) != want:
            bad.append("array")
        if sum(words.values()) != sum(i * i for i in range(10000)):
            bad.append("dict")
        m = np.ones((64, 64)) @ np.ones((64, 64))      # BLAS after restore
        if m[0, 0] != 64:
            bad.append("blas")
        if os.getpid() <= 0:
            bad.append("getpid")
        print("ok" if not bad else "FAIL " + " ".join(bad), flush=True)
        break
