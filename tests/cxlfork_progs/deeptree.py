"""A process tree three levels deep for the tree tests: root R forks A; A forks Z (exits 7
at once and stays A's zombie) and B; B forks C. Each of A, B, C fills 1 MiB of private
anonymous memory with its letter and blocks reading one byte from a pipe shared by the whole
tree. R prints "ready" once all exist; on a line on stdin it writes the three bytes; then
each checks its memory (its letter), drops it with MADV_DONTNEED (anonymous memory reads
zeros after that), waits for its own child by the stored PID and reports on a second shared
pipe "NAME pid ppid mem=.. dontneed=.. child=STATUS"; C exits 5, B 6, A 4. R prints the
sorted reports and "R pid a=STATUS". The output is the same in a clone restored with
--pidns new as in the original (the PIDs are the checkpointed ones)."""
import mmap
import os
import sys

SIZE = 1 << 20
go_r, go_w = os.pipe()
res_r, res_w = os.pipe()
rdy_r, rdy_w = os.pipe()


def memory(letter: bytes) -> mmap.mmap:
    m = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.write(letter * SIZE)
    return m


def report(name: str, m: mmap.mmap, letter: bytes, child: int | None) -> None:
    os.read(go_r, 1)
    mem = "ok" if m[:] == letter * SIZE else "wrong"
    m.madvise(mmap.MADV_DONTNEED)
    dn = "zeros" if m[:] == bytes(SIZE) else "stale"
    st = "-" if child is None else str(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
    os.write(res_w, f"{name} {os.getpid()} {os.getppid()} mem={mem} dontneed={dn} "
                    f"child={st}\n".encode())


if os.fork() == 0:                          # A
    z = os.fork()
    if z == 0:
        os._exit(7)
    os.waitid(os.P_PID, z, os.WEXITED | os.WNOWAIT)     # Z is a zombie now, not reaped
    m = memory(b"A")
    b = os.fork()
    if b == 0:                              # B
        m = memory(b"B")
        c = os.fork()
        if c == 0:                          # C
            m = memory(b"C")
            os.write(rdy_w, b"c")
            report("C", m, b"C", None)
            os._exit(5)
        os.write(rdy_w, b"b")
        report("B", m, b"B", c)
        os._exit(6)
    os.write(rdy_w, b"a")
    report("A", m, b"A", b)
    zst = os.waitstatus_to_exitcode(os.waitpid(z, 0)[1])
    os.write(res_w, f"Z {z} zombie={zst}\n".encode())
    os._exit(4)
got = b""
while len(got) < 3:
    got += os.read(rdy_r, 3)
print("ready", flush=True)
sys.stdin.readline()
os.write(go_w, b"xxx")
lines = []
while len(lines) < 4:
    lines += [x for x in os.read(res_r, 4096).decode().splitlines() if x]
a = os.wait()
print("\n".join(sorted(lines)), flush=True)
print(f"R {os.getpid()} a={os.waitstatus_to_exitcode(a[1])}", flush=True)
