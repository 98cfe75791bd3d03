"""`cxlfork pool checkpoint|restore|ls|rm|verify|gc`: images on the memory pool several hosts
share (cxlfork.poolstore; errors are one line through cxlfork.cli's group)."""
from __future__ import annotations

import json
import os
import sys

import click


@click.group(name="pool")
def command():
    """Images on the memory pool shared by several hosts (remote fork)."""


@command.command()
@click.argument("pid", type=int)
@click.argument("name")
@click.option("--leave-running/--kill", default=True,
              help="resume the process afterwards (default) or kill it once published")
@click.option("--json", "as_json", is_flag=True)
def checkpoint(pid, name, leave_running, as_json):
    """Checkpoint PID into this host's pool region as NAME."""
    from cxlfork import poolstore
    r = poolstore.checkpoint(pid, name, kill=not leave_running)
    if as_json:
        click.echo(json.dumps(r, indent=1))
    else:
        click.echo(f"checkpointed PID {pid} into the pool as {r['name']}: "
                   f"{r['bytes'] / 2**20:.1f} MiB at page {r['base']} of {r['store']}; total "
                   f"{r['total_s'] * 1e3:.1f} ms; {'killed' if r['killed'] else 'left running'}")


@command.command()
@click.argument("name")
@click.option("--policy", type=click.Choice(["mow", "moa"]), default="mow", show_default=True)
@click.option("--eager", is_flag=True, help="with --policy moa: copy everything at restore "
              "(required on the pool: lazy moa needs userfaultfd minor faults, not on DAX)")
@click.option("-n", "count", type=int, default=1, show_default=True, help="number of clones")
@click.option("--detach", is_flag=True, help="do not wait for the clones")
@click.option("--pidfile", type=click.Path(), default=None)
@click.option("--stdio", default="inherit", show_default=True,
              help="fds 0-2 of the clones: inherit, null, or a FILE (appended to)")
@click.option("--json", "as_json", is_flag=True)
def restore(name, policy, eager, count, detach, pidfile, stdio, as_json):
    """Restore clones of pool image NAME (or hH/NAME), checkpointed on any host."""
    import time
    from cxlfork import poolstore
    from cxlfork.errors import CxlforkError
    if eager and policy != "moa":
        raise CxlforkError("--eager goes with --policy moa")
    t0 = time.perf_counter()
    pids, rec = poolstore.restore(name, policy=policy, n=count, stdio=stdio, eager=eager,
                                  warn=lambda m: click.echo(f"cxlfork: warning: {m}", err=True))
    dt = time.perf_counter() - t0
    if pidfile:
        tmp = f"{pidfile}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write("".join(f"{p}\n" for p in pids))
        os.rename(tmp, pidfile)
    if as_json:
        click.echo(json.dumps({"pids": pids, "image": f"h{rec['host']}/{rec['name']}",
                               "policy": policy, "seconds": dt}), err=not detach)
    elif detach:
        click.echo(" ".join(map(str, pids)))
    if detach:
        return
    rc = 0
    for p in pids:
        _, st = os.waitpid(p, 0)
        code = os.waitstatus_to_exitcode(st)
        rc = rc or (128 - code if code < 0 else code)
    poolstore.prune()          # the clones are gone: their lease too (unless forks live on)
    sys.exit(rc)


@command.command(name="ls")
@click.option("--json", "as_json", is_flag=True)
def ls(as_json):
    """List the images published in the pool (every host's)."""
    from cxlfork import poolstore
    r = poolstore.listing()
    if as_json:
        click.echo(json.dumps(r, indent=1))
        return
    click.echo(f"pool {r['pool']}: hosts {r['hosts']}, this is host {r['host']}")
    for i in r["images"]:
        click.echo(f"  h{i['host']}/{i['name']:24s} {i['mib']:8.1f} MiB  {i['state']:9s} "
                   f"slot {i['slot']} seq {i['seq']}  leased by {i['leased_by_hosts']} host(s)")
    for t in r["torn"]:
        click.echo(f"  h{t['host']}.log slot {t['slot']}: {t['why']} (ignored)")


@command.command()
@click.argument("name")
@click.option("--ignore-host", type=int, multiple=True,
              help="a host that is gone: its leases do not count")
def rm(name, ignore_host):
    """Free pool image NAME of this host, unless clones on any host map it."""
    from cxlfork import poolstore
    r = poolstore.remove(name, tuple(ignore_host))
    click.echo(f"removed {r['removed']} ({r['mib']:.1f} MiB freed)")


@command.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def verify(name, as_json):
    """Check a pool image: its record, its manifest, the content hash of its pages."""
    from cxlfork import poolstore
    r = poolstore.verify(name)
    click.echo(json.dumps(r) if as_json else
               f"ok: {r['name']}: record, manifest, {r['pages']} pages (hash {r['hash']})")


@command.command()
@click.option("--json", "as_json", is_flag=True)
def gc(as_json):
    """Drop this host's stale leases; put back records an interrupted rm left half-removed."""
    from cxlfork import poolstore
    r = poolstore.gc()
    click.echo(json.dumps(r) if as_json else
               f"{r['leases_dropped']} stale lease(s) dropped; "
               f"{len(r['republished'])} record(s) put back: {' '.join(r['republished']) or '-'}")
