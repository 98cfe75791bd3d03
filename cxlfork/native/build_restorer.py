"""Compile cxlfork-restorer: the static, libc-free restorer (SOURCES + restorer.ld).

Called by setup.py's build_ext hook at pip install time (and runnable by hand:
`python cxlfork/native/build_restorer.py OUT`). Needs gcc (or $CC) and GNU ld.
"""
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = "cxlfork-restorer"
SOURCES = ("restorer.c", "restorer_ghost.c", "restorer_thread.c", "restorer_init.c",
           "restorer_creds.c")   # + restorer.h
CFLAGS = ["-O2", "-static", "-nostdlib", "-nostartfiles", "-ffreestanding", "-fno-builtin",
          "-fno-stack-protector", "-fpie", "-no-pie", "-fno-asynchronous-unwind-tables",
          "-fno-tree-loop-distribute-patterns", "-Wall"]
LDFLAGS = ["-Wl,-T," + os.path.join(HERE, "restorer.ld"), "-Wl,--build-id=none",
           "-Wl,--no-warn-rwx-segments"]


def build(out_dir: str) -> str:
    cc = os.environ.get("CC", "cc")
    if not shutil.which(cc):
        cc = "gcc"
    if not shutil.which(cc):
        sys.exit("cxlfork: no C compiler found (cc/gcc) to build cxlfork-restorer; install one, "
                 "e.g. 'apt-get install gcc', then run pip install again")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, NAME)
    cmd = [cc, *CFLAGS, *LDFLAGS, "-o", out + ".tmp", *(os.path.join(HERE, f) for f in SOURCES)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"cxlfork: building {NAME} failed:\n{' '.join(cmd)}\n{r.stderr}")
    os.replace(out + ".tmp", out)
    build_client(cc, out_dir)
    return out


CLIENT = "cxlfork-restore"


def build_client(cc: str, out_dir: str) -> str:
    """The fast `cxlfork restore` command (restore_client.c, an ordinary libc program): a
    client of the restore service that falls back to this interpreter's `-m cxlfork`."""
    out = os.path.join(out_dir, CLIENT)
    py = os.environ.get("CXLFORK_PYTHON") or sys.executable
    cmd = [cc, "-O2", "-Wall", f'-DCX_PYTHON="{py}"', "-o", out + ".tmp",
           os.path.join(HERE, "restore_client.c")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"cxlfork: building {CLIENT} failed:\n{' '.join(cmd)}\n{r.stderr}")
    os.replace(out + ".tmp", out)
    return out


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else HERE))
