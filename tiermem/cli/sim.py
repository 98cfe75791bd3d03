"""`tiermem sim`: replay a trace (or a synthetic workload) through several policies, side by side."""
from __future__ import annotations

import json
import sys

import click

from tiermem.errors import TiermemError

# Accesses of a synthetic workload, for `tiermem sim` and bench/bench_policies.py alike (one
# set of defaults: the CLI's 2,000,000 against the bench's 6,000,000 gave m5 0.86 of the
# oracle on sparse 25 % where the README's bench table shows 0.91: in a trace a third as
# long, the warm-up is a larger share).
DEFAULT_ACCESSES = 6_000_000

DEFAULT_POLICIES = "m5,damon,tpp,first-touch,oracle"


def _parse_params(items) -> dict[str, dict[str, str]]:
    from tiermem.policies.base import parse_param_string
    out: dict[str, dict[str, str]] = {}
    for it in items:
        if ":" not in it:
            raise TiermemError(f"--param {it!r}: expected POLICY:key=value[,key=value]")
        pol, rest = it.split(":", 1)
        out.setdefault(pol.strip(), {}).update(parse_param_string(rest))
    return out


def run_comparison(trace, names, model, params=None, progress=True):
    """SimResult per policy name (in order), with a click progress bar on stderr."""
    from tiermem.sim import simulate
    from tiermem.policies import make_policy
    params = params or {}
    unknown = set(params) - set(names)
    if unknown:
        raise TiermemError(f"--param given for {sorted(unknown)[0]!r}, which is not in "
                           "--policies")
    policies = [make_policy(n, params.get(n)) for n in names]   # validate all before running
    results = []
    total = len(trace) * len(policies)
    with click.progressbar(length=total, label="simulating", file=sys.stderr,
                           show_eta=True, width=30) as bar:
        for i, pol in enumerate(policies):
            done = [0]

            def tick(d, n, done=done):
                bar.update(d - done[0])
                done[0] = d
            results.append(simulate(trace, pol, model, progress=tick if progress else None))
    return results


def format_table(results, model, footprint_pages: int) -> str:
    oracle = next((r for r in results if r.policy == "oracle"), None)
    hdr = (f"{'policy':<20} {'fast ratio':>10} {'vs oracle':>9} {'est. time':>11} "
           f"{'time/oracle':>11} {'promoted':>9} {'demoted':>9} {'migrated':>10} "
           f"{'policy CPU':>10}")
    lines = [hdr, "-" * len(hdr)]
    for r in results:
        vs = f"{r.fast_ratio / oracle.fast_ratio:8.3f}x" if oracle and oracle.fast_ratio else \
            f"{'-':>9}"
        tv = f"{r.time_s / oracle.time_s:10.3f}x" if oracle and oracle.time_s else f"{'-':>11}"
        lines.append(f"{r.policy:<20} {r.fast_ratio:10.3f} {vs} {r.time_s * 1e3:8.2f} ms "
                     f"{tv} {r.promotions:9d} {r.demotions:9d} {r.migration_mb:7.1f} MB "
                     f"{r.policy_cpu_s:8.2f} s")
    fp = footprint_pages * 4096 / 2**20
    lines.append(f"footprint {fp:.1f} MB, fast tier {model.fast_mb:.1f} MB "
                 f"({100 * model.fast_mb / fp if fp else 0:.0f}%), budget {model.budget_mb} MB "
                 f"per epoch of {model.epoch_accesses} accesses, policies see 1 in "
                 f"{model.sample_every} accesses")
    return "\n".join(lines)


@click.command("sim")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False),
              help="trace file (.npz, see docs/policies.md)")
@click.option("--workload", help="synthetic workload instead of a trace: uniform, zipf, gups, "
                                 "hotset, sparse, pagerank, bfs")
@click.option("--accesses", type=int, default=DEFAULT_ACCESSES, show_default=True,
              help="accesses of the synthetic workload")
@click.option("--pages", type=int, default=16384, show_default=True,
              help="footprint of the synthetic workload, 4 KiB pages")
@click.option("--policies", default=DEFAULT_POLICIES, show_default=True,
              help="comma-separated policy names")
@click.option("--fast-mb", type=float, help="fast-tier capacity, MB")
@click.option("--fast-pct", type=float, help="fast-tier capacity, % of the trace's footprint")
@click.option("--budget-mb", type=float, default=2.0, show_default=True,
              help="migration budget per epoch, MB (promotions + demotions)")
@click.option("--epoch-accesses", type=int, default=100_000, show_default=True,
              help="accesses per epoch (traces with recorded epochs use theirs)")
@click.option("--sample-every", type=int, default=64, show_default=True,
              help="policies observe 1 in N accesses")
@click.option("--llc-mb", type=float, default=0.0, show_default=True,
              help="LLC filter size, MB (0 = off)")
@click.option("--param", "params", multiple=True,
              help="policy parameters, POLICY:key=value[,key=value] (repeatable)")
@click.option("--policy-file", multiple=True, type=click.Path(dir_okay=False),
              help="load a user policy from a .py file (repeatable)")
@click.option("--plot-dir", type=click.Path(file_okay=False),
              help="write fast_ratio.png and migrations.png into this directory (no plots "
                   "without it)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def command(trace_path, workload, accesses, pages, policies, fast_mb, fast_pct, budget_mb,
            epoch_accesses, sample_every, llc_mb, params, policy_file, plot_dir,
            as_json):
    """Compare tiering policies on the same accesses in the tiered-memory simulator."""
    from tiermem import synth
    from tiermem import trace as tracefmt
    from tiermem.sim import TierModel, model_dict
    from tiermem.policies import POLICIES, load_policy_file

    if (trace_path is None) == (workload is None):
        raise TiermemError("give exactly one of --trace FILE or --workload NAME")
    if (fast_mb is None) == (fast_pct is None):
        raise TiermemError("give exactly one of --fast-mb or --fast-pct")
    for f in policy_file:
        load_policy_file(f)
    names = [n.strip() for n in policies.split(",") if n.strip()]
    if not names:
        raise TiermemError("--policies is empty")
    for n in names:
        if n not in POLICIES:
            raise TiermemError(f"unknown policy {n!r} (known: {', '.join(sorted(POLICIES))})")
    if trace_path:
        tr = tracefmt.load(trace_path)
    elif workload in ("pagerank", "bfs"):     # sized by their graph, not pages/accesses
        tr = synth.generate(workload)
    else:
        tr = synth.generate(workload, pages=pages, accesses=accesses)
    if fast_pct is not None:
        if not 0 < fast_pct <= 100:
            raise TiermemError(f"--fast-pct must be in (0, 100], got {fast_pct}")
        fast_mb = tr.n_pages * 4096 * fast_pct / 100 / 2**20
    if fast_mb <= 0:
        raise TiermemError(f"--fast-mb must be > 0, got {fast_mb}")
    model = TierModel(fast_mb=fast_mb, budget_mb=budget_mb, epoch_accesses=epoch_accesses,
                      sample_every=sample_every, llc_mb=llc_mb)
    results = run_comparison(tr, names, model, _parse_params(params))
    title = trace_path or f"synthetic {workload}"
    plots = []
    if plot_dir:
        from tiermem.sim_plot import plot_results
        plots = plot_results(results, plot_dir, str(title))
    if as_json:
        out = {"trace": title, "accesses": len(tr), "footprint_mb": tr.n_pages * 4096 / 2**20,
               "model": model_dict(model), "plots": plots,
               "results": [r.summary() for r in results]}
        oracle = next((r for r in results if r.policy == "oracle"), None)
        if oracle and oracle.fast_ratio:
            for d, r in zip(out["results"], results):
                d["fast_ratio_vs_oracle"] = r.fast_ratio / oracle.fast_ratio
                d["time_vs_oracle"] = r.time_s / oracle.time_s
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(f"{title}: {len(tr)} accesses")
        click.echo(format_table(results, model, tr.n_pages))
        for p in plots:
            click.echo(f"plot: {p}")
