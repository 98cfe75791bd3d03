"""`tiermem emulate prepare|start|run|status|stop|demo`: the emulated CXL machine (registered
with `tiermem` through the `tiermem.commands` entry point, pyproject.toml).

Without --node, `start` boots a QEMU guest with a CPU node and CPU-less slow memory nodes
(SLIT + HMAT, lower memory tier) that keeps running after the command returns; `run` runs a
command in it; `stop` powers it off. With --node N on a host that really has several NUMA
nodes, node N is designated as the CXL tier instead (optionally with its CPUs offline,
restored on `stop`), and `run` runs commands on the host.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import click

from tiermem.errors import TiermemError


def _log(msg: str) -> None:
    click.echo(f"tiermem emulate: {msg}", err=True)


@click.group(name="emulate")
def command():
    """The emulated CXL machine (QEMU guest with a CPU-less slow memory node)."""


@command.command()
def prepare():
    """Download the guest kernel and build the initramfs (cached; quick the second time)."""
    from emulation.machine import prepare as do_prepare
    k, initrd = do_prepare(log=_log)
    click.echo(f"guest kernel {k.version}: {k.vmlinuz}")
    click.echo(f"initramfs: {initrd} ({os.path.getsize(initrd) / 2**20:.1f} MiB)")


@command.command()
@click.option("--cpus", type=int, default=None, help="vCPUs (all on node 0) [2; 1 per host "
              "with --hosts]")
@click.option("--fast-mem", type=int, default=None, help="node 0 memory, MiB [2048; 1024 per "
              "host with --hosts]")
@click.option("--slow-nodes", default=1, show_default=True, help="CPU-less slow nodes")
@click.option("--slow-mem", type=int, default=None, help="memory per slow node, MiB [2048; 256 "
              "with --hosts]")
@click.option("--fast-latency", default=100, show_default=True, help="node 0 HMAT latency, ns")
@click.option("--slow-latency", default=280, show_default=True, help="slow node HMAT latency, ns")
@click.option("--fast-bandwidth", default=40.0, show_default=True,
              help="node 0 HMAT bandwidth, GB/s")
@click.option("--slow-bandwidth", default=16.0, show_default=True,
              help="slow node HMAT bandwidth, GB/s")
@click.option("--distance", type=int, default=None,
              help="SLIT distance node 0 <-> slow nodes [default: 10 x latency ratio]")
@click.option("--workdir", default="/var/tmp/tiermem-work", show_default=True,
              help="host folder mounted writable at the same path in the guest")
@click.option("--timeout", default=240.0, show_default=True, help="boot timeout, s")
@click.option("--node", type=int, default=None,
              help="multi-node host: designate this real node as the CXL tier (no QEMU)")
@click.option("--offline-cpus", is_flag=True, help="with --node: take that node's CPUs offline")
@click.option("--hosts", type=int, default=1, show_default=True,
              help="emulated hosts; 2..4 share one memory pool (docs/emulation.md)")
@click.option("--pool-mib", type=int, default=1024, show_default=True,
              help="with --hosts: size of the shared pool, MiB (split into one region per host)")
def start(cpus, fast_mem, slow_nodes, slow_mem, fast_latency, slow_latency, fast_bandwidth,
          slow_bandwidth, distance, workdir, timeout, node, offline_cpus, hosts, pool_mib):
    """Boot the emulated CXL machine (or designate a real node with --node)."""
    from emulation import host_node
    from emulation.config import MachineConfig
    from emulation.machine import (DEFAULT_RUNDIR, Machine, _pid_is_qemu, read_state,
                                   remove_state, write_state)

    state = read_state(DEFAULT_RUNDIR)
    if state is not None:
        if state.get("mode") == "host":
            raise TiermemError(f"node {state['node']} is already designated as the CXL tier; "
                               f"run 'tiermem emulate stop' first")
        if state.get("mode") == "hosts":
            from emulation import hosts as hosts_mod
            if hosts_mod.status(state)["running"]:
                raise TiermemError(f"{state['hosts']} emulated hosts are already running; "
                                   f"run 'tiermem emulate stop' first")
            hosts_mod.stop(state, DEFAULT_RUNDIR)      # stale: every host is gone
        if _pid_is_qemu(state.get("qemu_pid", 0)):
            raise TiermemError(f"an emulated CXL machine is already running (QEMU pid "
                               f"{state['qemu_pid']}); run 'tiermem emulate stop' first")
        remove_state(DEFAULT_RUNDIR)   # stale state of a machine that is gone
    if offline_cpus and node is None:
        raise TiermemError("--offline-cpus needs --node")
    if hosts != 1 and node is not None:
        raise TiermemError("--hosts and --node exclude each other")
    if node is not None:
        write_state(DEFAULT_RUNDIR, host_node.designate(node, offline_cpus, log=_log))
        return
    multi = hosts != 1
    cfg = MachineConfig(cpus=cpus or (1 if multi else 2),
                        fast_mem_mib=fast_mem or (1024 if multi else 2048),
                        slow_nodes=slow_nodes,
                        slow_mem_mib=slow_mem or (256 if multi else 2048),
                        fast_latency_ns=fast_latency,
                        slow_latency_ns=slow_latency, fast_bandwidth_gbs=fast_bandwidth,
                        slow_bandwidth_gbs=slow_bandwidth, slow_distance=distance)
    if multi:
        from emulation import hosts as hosts_mod
        hosts_mod.check(hosts, pool_mib)
        st = hosts_mod.start(hosts, pool_mib, cfg, workdir, DEFAULT_RUNDIR, timeout, log=_log)
        for rec in st["machines"]:
            click.echo(f"host {rec['host']}: QEMU pid {rec['qemu_pid']}, booted in "
                       f"{rec['boot_s']:.1f} s")
        click.echo(f"pool: {pool_mib} MiB shared, mounted at {st['pool']['path']} in every "
                   f"host; work folder {workdir}")
        return
    m = Machine(cfg, workdir=workdir, rundir=DEFAULT_RUNDIR, detach=True)
    m.start(timeout=timeout, log=_log)
    m.close_connection()
    click.echo(f"emulated CXL machine running: QEMU pid {m.pid}, booted in {m.boot_s:.1f} s, "
               f"work folder {m.workdir}")


@command.command(context_settings={"ignore_unknown_options": True})
@click.option("--timeout", default=600.0, show_default=True, help="command timeout, s")
@click.option("--json", "as_json", is_flag=True, help="print returncode/stdout/stderr as JSON")
@click.option("--host", type=int, default=None, help="with --hosts: which host runs CMD")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def run(ctx, timeout, as_json, host, cmd):
    """Run CMD in the emulated CXL machine; exit with its exit status.

    Several arguments run as an argv; a single argument runs through /bin/sh -c.
    """
    from emulation.machine import DEFAULT_RUNDIR, Machine, RunResult, read_state

    state = read_state(DEFAULT_RUNDIR)
    target = list(cmd) if len(cmd) > 1 else cmd[0]
    multi = state is not None and state.get("mode") == "hosts"
    if multi and host is None:
        raise TiermemError(f"{state['hosts']} emulated hosts are running: say which with "
                           f"--host 0..{state['hosts'] - 1}")
    if not multi and host not in (None, 0):
        raise TiermemError("--host N needs several emulated hosts "
                           "('tiermem emulate start --hosts 2')")
    if multi:
        from emulation import hosts as hosts_mod
        m = hosts_mod.attach(state, host)
        try:
            r = m.run(target, timeout=timeout)
        finally:
            m.close_connection()
    elif state is not None and state.get("mode") == "host":
        t0 = time.monotonic()
        env = dict(os.environ, TIERMEM_CXL_NODE=str(state["node"]))
        try:
            p = subprocess.run(target, shell=isinstance(target, str), env=env,
                               capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError as e:
            raise TiermemError(f"cannot run {cmd[0]!r}: {e.strerror}") from e
        except subprocess.TimeoutExpired as e:
            raise TiermemError(f"command timed out after {timeout:g} s: {' '.join(cmd)}") from e
        r = RunResult(p.returncode, p.stdout, p.stderr, time.monotonic() - t0)
    else:
        m = Machine.attach(DEFAULT_RUNDIR)
        try:
            r = m.run(target, timeout=timeout)
        finally:
            m.close_connection()
    if as_json:
        click.echo(json.dumps({"returncode": r.returncode, "stdout": r.stdout,
                               "stderr": r.stderr, "duration_s": round(r.duration_s, 3)}))
    else:
        click.echo(r.stdout, nl=False)
        click.echo(r.stderr, nl=False, err=True)
    ctx.exit(r.returncode)


@command.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def status(as_json):
    """Show whether an emulated CXL machine (or a designated node) is active."""
    from emulation.machine import DEFAULT_RUNDIR, _pid_is_qemu, read_state

    state = read_state(DEFAULT_RUNDIR)
    if state is not None and state.get("mode") == "hosts":
        from emulation import hosts as hosts_mod
        st = hosts_mod.status(state)
        if as_json:
            click.echo(json.dumps(st, indent=1))
            return
        for rec in st["machines"]:
            click.echo(f"host {rec['host']}: QEMU pid {rec['qemu_pid']} "
                       f"({'running' if rec['running'] else 'gone'}), booted in "
                       f"{rec['boot_s']:.1f} s, console log {rec['console']}")
        p = st["pool"]
        click.echo(f"pool: {p['pool_mib']} MiB ({st['hosts']} regions of {p['region_mib']} "
                   f"MiB, {p['device']}, {p['fs']}) at {p['path']} in every host")
        return
    if state is not None and state.get("mode") == "qemu":
        state["running"] = _pid_is_qemu(state["qemu_pid"])
        state["uptime_s"] = round(time.time() - state["started_at"], 1)
    if as_json:
        click.echo(json.dumps(state or {"mode": None, "running": False}, indent=1))
        return
    if state is None:
        click.echo("no emulated CXL machine is running")
    elif state["mode"] == "host":
        click.echo(f"host node {state['node']} designated as the CXL tier; CPUs taken offline: "
                   f"{state['offlined_cpus'] or 'none'}")
    else:
        c = state["config"]
        click.echo(f"QEMU pid {state['qemu_pid']} ({'running' if state['running'] else 'gone'}), "
                   f"up {state['uptime_s']:.0f} s, booted in {state['boot_s']:.1f} s, kernel "
                   f"{state['kernel']}")
        click.echo(f"node 0: {c['cpus']} CPUs, {c['fast_mem_mib']} MiB, {c['fast_latency_ns']} ns, "
                   f"{c['fast_bandwidth_gbs']} GB/s")
        click.echo(f"nodes 1-{c['slow_nodes']}: no CPUs, {c['slow_mem_mib']} MiB each, "
                   f"{c['slow_latency_ns']} ns, {c['slow_bandwidth_gbs']} GB/s, distance "
                   f"{c['slow_distance']}")
        click.echo(f"work folder: {state['workdir']}; console log: {state['console']}")


@command.command()
def stop():
    """Power off the emulated CXL machine (or restore a designated node's CPUs)."""
    from emulation import host_node
    from emulation.machine import DEFAULT_RUNDIR, Machine, read_state, remove_state

    state = read_state(DEFAULT_RUNDIR)
    if state is None:
        raise TiermemError("no emulated CXL machine is running")
    if state.get("mode") == "hosts":
        from emulation import hosts as hosts_mod
        pids = hosts_mod.stop(state, DEFAULT_RUNDIR)
        click.echo(f"{state['hosts']} emulated hosts stopped (QEMU pids "
                   f"{', '.join(map(str, pids)) or 'none left'}); pool removed")
        return
    if state.get("mode") == "host":
        host_node.restore(state, log=_log)
        remove_state(DEFAULT_RUNDIR)
        click.echo(f"node {state['node']} released")
        return
    try:
        m = Machine.attach(DEFAULT_RUNDIR)
    except TiermemError as e:
        remove_state(DEFAULT_RUNDIR)
        raise TiermemError(f"nothing to stop: {e}") from e
    m.stop()
    click.echo(f"emulated CXL machine stopped (QEMU pid {state['qemu_pid']})")


@command.command()
@click.option("--seconds", type=click.IntRange(8, 3600), default=40, show_default=True,
              help="per tiering run (4 runs: dense and sparse, tiermemd-m5 and kernel)")
@click.option("--quick", is_flag=True, help="skip topo --measure and the tiermem move "
              "walk-through: the tiering runs and demo.json only")
@click.option("--out", "out_dir", default=None,
              help="folder for demo.json and the plot (default $TIERMEM_DEMO_OUT or demo-out)")
def demo(seconds, quick, out_dir):
    """Boot the machine and show tiering on it: topology, a workload on the slow node, a move,
    then tiermemd-m5 against the kernel's tiering on a dense and a sparse workload
    (demo-out/demo.json, a plot and a side-by-side table)."""
    from emulation.demo import main as run_demo
    run_demo(out_dir=out_dir, tiering_seconds=seconds, quick=quick)
