"""cffi builder for cxlfork's C helpers (cxlfork._native). Used by setup.py at pip install."""
import os
import shutil
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

if not (shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")):
    sys.exit("cxlfork: no C compiler found (cc/gcc); install one, e.g. 'apt-get install gcc', "
             "then run pip install again")


def _header_decls():
    with open(os.path.join(HERE, "cxlfork_native.h")) as f:
        return "".join(line for line in f if not line.startswith("#"))


SOURCES = ("hash.c", "ptrace.c", "fdpeek.c", "dump.c", "spawn.c", "handover.c", "lazy.c",
           "netns.c")

ffibuilder = FFI()
ffibuilder.cdef(_header_decls())
ffibuilder.set_source(
    "cxlfork._native",
    '#include "cxlfork_native.h"',
    # one C file per concern; cx_internal.h holds what they share
    sources=[os.path.relpath(os.path.join(HERE, name)) for name in SOURCES],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-O2", "-Wall", "-std=gnu11", "-pthread"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
