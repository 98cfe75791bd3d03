"""`tiermem trace`: capture a program's memory accesses (valgrind lackey), or write a synthetic
workload, into a trace file; `--show` summarises an existing trace."""
from __future__ import annotations

import json
import os
import sys
import time

import click

from tiermem.errors import TiermemError


def _summary(tr, path) -> dict:
    import numpy as np
    counts = np.bincount(tr.page_idx, minlength=tr.n_pages)
    top = np.sort(counts)[::-1]
    n90 = int(np.searchsorted(np.cumsum(top), 0.9 * top.sum()) + 1)
    return {"path": path, "accesses": len(tr), "pages": tr.n_pages,
            "footprint_mb": tr.n_pages * 4096 / 2**20, "sub_page": tr.sub_page,
            "space": tr.space, "pids": sorted({int(x) for x in np.unique(tr.page_pid)}),
            "epochs": None if tr.epoch is None else int(tr.epoch[-1]) + 1,
            "pages_for_90pct_of_accesses": n90,
            "writes_pct": None if tr.is_write is None else float(100 * tr.is_write.mean()),
            "meta": tr.meta}


@click.command("trace", context_settings={"ignore_unknown_options": True})
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="trace file to write")
@click.option("--sample-every", type=int, default=16, show_default=True,
              help="keep 1 in N data accesses (lackey)")
@click.option("--max-samples", type=int, default=20_000_000, show_default=True,
              help="stop recording after this many kept accesses")
@click.option("--follow-exec/--no-follow-exec", default=True, show_default=True,
              help="trace through exec (wrappers such as env, pyenv shims, shell scripts; "
                   "children that exec are traced too)")
@click.option("--workload", help="write a synthetic workload instead of running a command")
@click.option("--accesses", type=int, default=2_000_000, show_default=True,
              help="accesses of the synthetic workload")
@click.option("--pages", type=int, default=16384, show_default=True,
              help="footprint of the synthetic workload, 4 KiB pages")
@click.option("--show", "show", type=click.Path(dir_okay=False),
              help="summarise an existing trace instead")
@click.option("--json", "as_json", is_flag=True, help="machine-readable summary")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED)
def command(output, sample_every, max_samples, follow_exec, workload, accesses, pages, show, as_json, cmd):
    """Record memory accesses of CMD (tiermem trace -o T.npz -- CMD ARGS).

    Ctrl-C stops CMD and writes what was kept so far."""
    from tiermem import synth
    from tiermem import trace as tracefmt
    from tiermem.trace_capture import capture

    modes = sum(x is not None and x != () for x in (show, workload, cmd or None))
    if modes != 1:
        raise TiermemError("give exactly one of: -- CMD ARGS, --workload NAME, --show FILE")
    if show:
        tr = tracefmt.load(show)
    else:
        if not output:
            raise TiermemError("-o/--output is required to write a trace")
        if os.path.isdir(output):
            raise TiermemError(f"-o {output}: is a directory")
        t0 = time.monotonic()
        if workload:
            if workload in ("pagerank", "bfs"):
                tr = synth.generate(workload)
            else:
                tr = synth.generate(workload, pages=pages, accesses=accesses)
        else:
            last = [0.0]

            def progress(seen, kept):
                now = time.monotonic()
                if now - last[0] >= 1.0:
                    last[0] = now
                    click.echo(f"\rtracing: {seen / 1e6:8.2f} M accesses seen, "
                               f"{kept / 1e6:6.2f} M kept, {now - t0:5.0f} s", err=True,
                               nl=False)
            tr = capture(list(cmd), sample_every=sample_every, max_samples=max_samples,
                         progress=progress, follow_exec=follow_exec)
            click.echo("", err=True)
            if tr.meta.get("interrupted"):
                click.echo("tiermem trace: interrupted: writing the accesses kept so far",
                           err=True)
        tr.save(output)
        click.echo(f"wrote {output}: {len(tr)} accesses over {tr.n_pages} pages "
                   f"({tr.n_pages * 4096 / 2**20:.1f} MB) in {time.monotonic() - t0:.1f} s",
                   err=True)
    s = _summary(tr, show or output)
    if as_json:
        click.echo(json.dumps(s, indent=2))
    elif show:
        for k, v in s.items():
            if k != "meta":
                click.echo(f"{k:<28} {v}")
        click.echo(f"{'meta':<28} {json.dumps(tr.meta)}")
    sys.stdout.flush()
