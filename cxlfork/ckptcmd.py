"""The `cxlfork checkpoint` command's work and output, without click: run by the quick
entry point (cxlfork.entry) and by the click CLI (cxlfork.cli), which prints its warnings and
progress through these functions too."""
from __future__ import annotations

import json
import sys


def echo(msg: str, err: bool = False, nl: bool = True) -> None:
    f = sys.stderr if err else sys.stdout
    f.write(msg + ("\n" if nl else ""))
    f.flush()


def warn(msg: str) -> None:
    echo(f"cxlfork: warning: {msg}", err=True)


def progress(label: str):
    """A progress printer for a terminal on stderr, else None."""
    if not sys.stderr.isatty():
        return None

    def show(done, total):
        pct = 100.0 * done / total if total else 100.0
        echo(f"\r{label}: {done / 2**20:8.1f} / {total / 2**20:.1f} MiB ({pct:5.1f}%)",
             err=True, nl=done >= total)
    return show


def checkpoint(pid: int, image: str, leave_running: bool, store: str | None,
               as_json: bool) -> None:
    """`cxlfork checkpoint`: a single process, or a whole tree; prints the summary."""
    from cxlfork.tree import checkpoint_tree
    r = checkpoint_tree(pid, image, store, kill=not leave_running, progress=progress("pages"),
                        warn=warn)
    if as_json:
        echo(json.dumps(r, indent=1))
        return
    rate = r["bytes"] / r["pages_ms"] * 1e3 / 2**30 if r["pages_ms"] > 0 else 0.0
    echo(f"checkpointed PID {pid} into {r['image']}: {r['bytes'] / 2**20:.1f} MiB in "
         f"{r['pages']} pages to {r['store']} (node {r['node']}); total "
         f"{r['total_s'] * 1e3:.1f} ms, process frozen {r['frozen_ms']:.1f} ms, pages "
         f"{r['pages_ms']:.1f} ms ({rate:.2f} GiB/s); "
         f"{'killed' if r['killed'] else 'left running'}")
