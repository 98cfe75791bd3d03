"""`tiermem ctl`: talk to a running tiermemd over its control socket (root only).

    tiermem ctl status [--json]        targets, processes, samplers, policies, state
    tiermem ctl stats  [--json]        pages promoted/demoted, failures by errno, MB/s, ...
    tiermem ctl pause | resume         stop / restart moving pages (sampling state kept)
    tiermem ctl reload                 reload the config (a bad config is refused)
    tiermem ctl policy TARGET NAME     switch a target's policy until the next reload
"""
from __future__ import annotations

import click

from tiermem.cli.common import echo_json

DEFAULT_SOCKET = "/run/tiermemd.sock"


def _req(ctx, **req) -> dict:
    from tiermem.control import request
    return request(ctx.obj["socket"], req)


@click.group("ctl")
@click.option("--socket", "sock", default=DEFAULT_SOCKET, show_default=True,
              envvar="TIERMEMD_SOCKET", help="tiermemd's control socket")
@click.pass_context
def command(ctx, sock):
    """Control a running tiermemd."""
    ctx.ensure_object(dict)
    ctx.obj["socket"] = sock


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


@command.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def status(ctx, as_json):
    """Targets, their processes, sampler and policy."""
    r = _req(ctx, cmd="status")
    r.pop("ok", None)
    if as_json:
        return echo_json(r)
    click.echo(f"tiermemd PID {r['pid']}, up {r['uptime_seconds']:.0f} s, "
               f"{'PAUSED' if r['paused'] else 'running'}"
               f"{', dry run' if r['dry_run'] else ''}; config {r['config']}")
    click.echo(f"fast nodes {r['fast_nodes']}, slow nodes {r['slow_nodes']}, interval "
               f"{r['interval_seconds']} s, budget {r['bandwidth_mb_per_s']} MB/s in batches "
               f"of {r['batch_pages']} pages, mover {r['mover']}")
    click.echo(f"{'TARGET':16} {'SAMPLER':10} {'POLICY':12} {'PIDS':24} ERRORS")
    for t in r["targets"]:
        pids = ",".join(map(str, t["pids"])) or "-"
        click.echo(f"{t['name']:16} {t['sampler']:10} {t['policy']:12} {pids[:24]:24} "
                   f"{t['errors']}")
        for e in filter(None, {t["sampler_error"], t["last_error"]}):
            click.echo(f"  last error: {e}")


@command.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def stats(ctx, as_json):
    """Counters: pages moved, failures by errno, MB/s, fast-tier share, CPU cost, lag."""
    r = _req(ctx, cmd="stats")
    r.pop("ok", None)
    if as_json:
        return echo_json(r)
    click.echo(f"up {r['uptime_seconds']:.0f} s, {r['loops']} loops, daemon CPU "
               f"{r['daemon_cpu_seconds']:.2f} s ({r['daemon_cpu_percent_of_core']:.2f} % of a "
               f"core), migration {r['migration_mb_per_s']:.1f} MB/s, "
               f"{r['bytes_moved'] / 2**20:.1f} MiB moved, loop lag "
               f"{1000 * r['loop_lag_seconds']:.1f} ms, loop {1000 * r['loop_seconds']:.1f} ms")
    click.echo(f"{'TARGET':16} {'PROCS':>5} {'PROMOTED':>10} {'DEMOTED':>10} {'FAST':>9} "
               f"{'FAST ACC':>9} {'SAMPLER CPU':>11}  FAILURES")
    for name, t in r["targets"].items():
        fails = ", ".join(f"{k} {v}" for k, v in sorted(t["failures_by_errno"].items())) or "-"
        click.echo(f"{name:16} {t['processes']:>5} {t['pages_promoted']:>10} "
                   f"{t['pages_demoted']:>10} {_pct(t['fast_tier_share']):>9} "
                   f"{_pct(t['fast_tier_access_share']):>9} "
                   f"{t['sampler_cpu_seconds']:>9.2f} s  {fails}")
        click.echo(f"{'':16} {t.get('processes_exited', 0)} processes exited mid-run, "
                   f"{t.get('node_full_events', 0)} moves stopped by a full node (ENOMEM), "
                   f"{t.get('pages_refused', 0)} pages refused by the kernel (EBUSY, ...)")
    click.echo("(pages are 4 KiB; FAST = share of present pages on the fast tier, "
               "FAST ACC = share of sampled accesses)")


@command.command()
@click.pass_context
def pause(ctx):
    """Stop sampling and moving pages until resume."""
    _req(ctx, cmd="pause")
    click.echo("tiermemd paused")


@command.command()
@click.pass_context
def resume(ctx):
    """Resume after pause."""
    _req(ctx, cmd="resume")
    click.echo("tiermemd resumed")


@command.command()
@click.pass_context
def reload(ctx):
    """Reload the config file; a bad config is refused and the old one keeps running."""
    r = _req(ctx, cmd="reload")
    click.echo(f"tiermemd reloaded: targets {', '.join(r['targets'])}")


@command.command()
@click.argument("target")
@click.argument("name")
@click.pass_context
def policy(ctx, target, name):
    """Switch TARGET to policy NAME (default parameters unless NAME is the configured one)."""
    _req(ctx, cmd="policy", target=target, policy=name)
    click.echo(f"target {target}: policy {name}")
