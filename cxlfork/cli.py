"""The `cxlfork` command: checkpoint, restore, inspect, verify, rm, gc, profile.

Errors are one line on stderr (`cxlfork: error: ...`) and exit status 1.
"""
from __future__ import annotations

import json
import os
import sys

import click

from cxlfork.ckptcmd import warn as _warn
from tiermem.errors import TiermemError

# command groups imported only when named (a checkpoint or restore does not pay for them)
_LAZY = {"porter": "cxlfork.porter.cli", "pool": "cxlfork.poolcli"}


class _Group(click.Group):
    """Turns TiermemError / OSError into one line on stderr and a non-zero exit; loads the
    groups of _LAZY on first use."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(_LAZY))

    def get_command(self, ctx, name):
        if name in _LAZY and name not in self.commands:
            import importlib
            self.add_command(importlib.import_module(_LAZY[name]).command, name)
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TiermemError as e:
            click.echo(f"cxlfork: error: {e}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:
            fn = f" ({e.filename})" if getattr(e, "filename", None) else ""
            click.echo(f"cxlfork: error: {e.strerror or e}{fn}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tiermem")
def main():
    """cxlfork: checkpoint a process into the CXL-tier page store, restore CoW clones."""


@main.command()
@click.argument("pid", type=int)
@click.option("-o", "--output", "image", required=True, type=click.Path(),
              help="image directory to create")
@click.option("--leave-running/--kill", default=True,
              help="resume the process afterwards (default) or kill it once the image is "
                   "published")
@click.option("--store", type=click.Path(), default=None,
              help="page store directory on tmpfs (default: $CXLFORK_STORE, "
                   "/var/lib/cxlfork/store, /dev/shm/cxlfork-store)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def checkpoint(pid, image, leave_running, store, as_json):
    """Checkpoint process PID into IMAGE."""
    from cxlfork.ckptcmd import checkpoint as run    # also run without click: cxlfork.entry
    run(pid, image, leave_running, store, as_json)


@main.command()
@click.argument("image", type=click.Path())
@click.option("--policy", type=click.Choice(["mow", "moa", "hybrid"]), default="mow",
              show_default=True, help="mow: map the store copy-on-write; moa: migrate on access "
              "(each block copied to local memory on first touch, through userfaultfd; --eager "
              "copies everything at restore); hybrid: copy pages clones touched (cxlfork "
              "profile), map the rest")
@click.option("--eager", is_flag=True, help="with --policy moa: copy every page at restore "
              "instead of on first touch")
@click.option("-n", "count", type=int, default=1, show_default=True, help="number of clones")
@click.option("--detach", is_flag=True, help="do not wait for the clones")
@click.option("--pidfile", type=click.Path(), default=None,
              help="write every clone's PID, one a line")
@click.option("--stdio", default="auto", show_default=True,
              help="fds 0-2 of the clones: original (files reopened as the original had "
              "them: path, flags, offset), inherit, null, or a FILE (appended to); auto: "
              "original when fds 0-2 were regular files (or /dev/null), else inherit")
@click.option("--same-pid", is_flag=True, help="restore one clone under the original PID")
@click.option("--netns", type=click.Choice(["new", "host"]), default="new", show_default=True,
              help="an image with inet or named unix sockets: each clone in a network "
              "namespace of its own (new), or in this one (host: its ports must be free)")
@click.option("--pidns", type=click.Choice(["host", "new"]), default="host", show_default=True,
              help="new: each clone in a new PID namespace of its own, under the original "
              "PID and thread IDs (getpid() and stored PIDs stay right); host: in this one, "
              "under new PIDs")
@click.option("--json", "as_json", is_flag=True, help="print PIDs, network and PID "
              "namespaces and timing as JSON")
def restore(image, policy, count, detach, pidfile, stdio, same_pid, eager, netns, pidns,
            as_json):
    """Restore clones of IMAGE; waits for them unless --detach (exit status: the first
    failing clone's). This command serves the clones' userfaultfd (first touches of store pages:
    lazy moa copies them; zeros after MADV_DONTNEED, mremap) while it waits; with --detach a
    small process it forks stays behind to do it until they exit."""
    import time
    from cxlfork.errors import CxlforkError
    from cxlfork.restore import (pause_lazy, restore as do, serve_lazy_forever, serving,
                                 sync_lazy)
    if eager and policy != "moa":
        raise CxlforkError("--eager goes with --policy moa")
    if pidfile:
        _check_pidfile(pidfile)               # before any clone is made
    t0 = time.perf_counter()
    from cxlfork import tree
    if os.path.isdir(image) and tree.is_tree(image):
        if pidns != "new" or same_pid:
            raise CxlforkError(f"{image} holds a process tree: it restores only with --pidns "
                               "new (its processes keep their PIDs in a namespace of their own)")
        pids = tree.restore_tree(image, policy=policy, n=count, stdio=stdio, warn=_warn,
                                 eager=eager, netns=netns)
    else:
        pids = do(image, policy=policy, n=count, stdio=stdio, same_pid=same_pid, warn=_warn,
                  eager=eager, netns=netns, pidns=pidns)
    dt = time.perf_counter() - t0
    if pidfile:
        _write_pidfile(pidfile, pids)         # kills the clones if it fails
    from cxlfork import service as svc     # in the restore service: svc.detached_serve is set
    lazy_detach = detach and serving()     # store-mapped anonymous runs: the handler stays
    if lazy_detach:
        sync_lazy()
        pause_lazy()                       # from here on only the child below serves
    if lazy_detach and svc.detached_serve is None and os.fork() == 0:
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.setsid()
        serve_lazy_forever()
        os._exit(0)
    if as_json:
        from cxlfork.state.netns import of
        from cxlfork.state.pidns import info
        clones = [{**info(p), "netns": f"/proc/{p}/ns/net", "netns_id": of(p)} for p in pids]
        click.echo(json.dumps({"pids": pids, "clones": clones, "policy": policy,
                               "seconds": dt}), err=not detach)
    elif detach:
        click.echo(" ".join(map(str, pids)))
    if detach:
        if lazy_detach and svc.detached_serve is not None:
            svc.detached_serve()              # the restore service: no fork (never returns)
        return
    rc = 0
    for p in pids:
        _, st = os.waitpid(p, 0)
        code = os.waitstatus_to_exitcode(st)
        code = 128 - code if code < 0 else code
        rc = rc or code
    from cxlfork.state.pidns import wait_inits
    wait_inits()                              # their namespaces' inits exit after them
    sys.exit(rc)


def _check_pidfile(path: str) -> None:
    from cxlfork.errors import CxlforkError
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise CxlforkError(f"--pidfile {path}: directory {d} does not exist")
    if os.path.isdir(path):
        raise CxlforkError(f"--pidfile {path} is a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        raise CxlforkError(f"--pidfile {path}: cannot write in {d}")


def _write_pidfile(path: str, pids: list[int]) -> None:
    """Write the PIDs (temporary file renamed into place); on failure kill and reap the
    clones, so nothing runs that nobody was told about."""
    import signal
    from cxlfork.errors import CxlforkError
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        # O_EXCL | O_NOFOLLOW: a name planted in a shared directory is not followed
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{p}\n" for p in pids))
        os.rename(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
                os.waitpid(p, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        raise CxlforkError(f"--pidfile {path}: {e.strerror}; killed the {len(pids)} "
                           "clone(s) restored") from e


@main.command()
@click.option("--socket", "path", default=None, type=click.Path(),
              help="unix socket to listen on [default: $CXLFORK_SERVICE_SOCK, else "
              "/run/cxlfork/restore.sock]")
def service(path):
    """Serve restores (root, foreground until SIGTERM): `cxlfork-restore IMAGE [options]`
    then runs `cxlfork restore` here for its caller, without starting an interpreter
    (cxlfork/service.py says who may ask and what is checked)."""
    from cxlfork import service as svc
    svc.serve(main, path or os.environ.get("CXLFORK_SERVICE_SOCK") or svc.SOCK)


@main.command()
@click.argument("image", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print the whole manifest as JSON")
def inspect(image, as_json):
    """Show what IMAGE holds: process, mappings, fds, store."""
    from cxlfork import image as image_mod
    m = image_mod.load(image)
    if as_json:
        click.echo(json.dumps(m, indent=1, sort_keys=True))
        return
    p, s = m["process"], m["store"]
    click.echo(f"image      {os.path.abspath(image)}  (format {m['format']} v{m['version']}, "
               f"id {m['id']})")
    click.echo(f"process    PID {p['pid']} {p['comm']!r}  exe {p['exe']['path']}  cwd {p['cwd']}")
    click.echo(f"kernel     {m['kernel']} {m['machine']}")
    click.echo(f"store      {os.path.join(s['dir'], s['file'])}  {s['pages']} pages = "
               f"{s['pages'] * 4096 / 2**20:.1f} MiB  node {s['node']}  hash {s['hash']}")
    st = m.get("stats", {})
    if st:
        click.echo(f"checkpoint frozen {st.get('frozen_ms', 0):.1f} ms, pages "
                   f"{st.get('pages_ms', 0):.1f} ms")
    r = m["regs"]
    click.echo(f"registers  rip {r['rip']:#x}  rsp {r['rsp']:#x}  fs_base {r['fs_base']:#x}  "
               f"xstate {len(image_mod.unb64(m['xstate'], 'xstate'))} B")
    click.echo(f"signals    {len(m['signals']['actions'])} actions, blocked "
               f"{m['signals']['blocked']:#x}; rseq "
               f"{'%#x' % m['rseq']['addr'] if m['rseq'] else 'none'}")
    click.echo(f"mappings   {len(m['vmas'])}:")
    for v in m["vmas"]:
        prot = "".join(c if v["prot"] & b else "-" for c, b in (("r", 1), ("w", 2), ("x", 4)))
        prot += "s" if v["shared"] else "p"
        stored = sum(r[1] for r in v["runs"]) * 4096
        name = v.get("path") or ""
        click.echo(f"  {v['start']:012x}-{v['end']:012x} {prot} {v['kind']:7s} "
                   f"{(v['end'] - v['start']) / 1024:10.0f} KiB  stored {stored / 1024:8.0f} KiB"
                   f"  {name}")
    click.echo(f"fds        {len(m['fds'])}:")
    for f in m["fds"]:
        what = f.get("path") or f.get("link", "")
        if f["kind"] == "inet" and f.get("dup_of") is None:
            from cxlfork.state.inet import describe
            what += f"  {describe(f)} {f['state']}" + \
                (f" backlog {f['backlog']}" if f["state"] == "listen" else "")
        elif f["kind"] == "unix" and f.get("dup_of") is None:
            import base64
            name = base64.b64decode(f["name"]).decode(errors="backslashreplace")
            what += f"  {f['state']}" + (f" @{name}" if name else "")
        extra = f"  pos {f['pos']}" if "pos" in f else ""
        click.echo(f"  {f['fd']:4d} {f['kind']:8s} flags {f['flags']:#o}"
                   f"{' cloexec' if f['cloexec'] else ''}  {what}{extra}"
                   f"{'  dup of ' + str(f['dup_of']) if f.get('dup_of') is not None else ''}")


@main.command()
@click.argument("image", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
def verify(image, as_json):
    """Check IMAGE completely: manifest seal (your key) and fields, page file owner, size,
    pin and content hash, executable and mapped files unchanged."""
    from cxlfork import image as image_mod
    r = image_mod.verify(image)
    if as_json:
        click.echo(json.dumps(dict(r, ok=True)))
    else:
        click.echo(f"ok: {r['image']} (id {r['id']}): manifest, {r['pages']} pages "
                   f"({r['pages'] * 4096 / 2**20:.1f} MiB), {r['vmas']} mappings, "
                   f"{r['fds']} fds")


@main.command()
@click.argument("image", type=click.Path())
def rm(image):
    """Remove IMAGE and its page file from the store (only an image sealed with your key,
    and only files inside a store directory of yours)."""
    from cxlfork import image as image_mod
    for p in image_mod.remove(image):
        click.echo(f"removed {p}")


@main.command()
@click.option("--store", type=click.Path(), default=None, help="page store directory")
@click.option("--json", "as_json", is_flag=True)
def gc(store, as_json):
    """Remove page files no image uses and leftovers of interrupted checkpoints."""
    from cxlfork.store import gc as do, open_store
    removed = do(open_store(store, create=False))
    if as_json:
        click.echo(json.dumps({"removed": removed}))
    else:
        for p in removed:
            click.echo(f"removed {p}")
        click.echo(f"{len(removed)} files removed")


@main.command()
@click.argument("image", type=click.Path())
@click.argument("pids", type=int, nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True)
def profile(image, pids, as_json):
    """Record which store pages the running clones PIDS of IMAGE have touched (pagemap
    presence), for --policy hybrid. Adds to an earlier record."""
    from cxlfork.profile import record
    r = record(image, list(pids))
    if as_json:
        click.echo(json.dumps(r))
    else:
        click.echo(f"{r['hot_pages']} of {r['pages']} pages touched "
                   f"({r['hot_pages'] * 4096 / 2**20:.1f} MiB) recorded in {r['file']}")


