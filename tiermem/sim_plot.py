"""PNG plots of simulator results: fast-tier access ratio over time, migrations per epoch."""
from __future__ import annotations

import os

import numpy as np


def plot_results(results, out_dir: str, title: str) -> list[str]:
    """Two PNGs in out_dir (created if missing); returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    for r in results:
        e = r.epochs
        t = np.cumsum(e["time_s"]) * 1e3
        ratio = np.divide(e["fast_accesses"], e["mem_accesses"],
                          out=np.zeros_like(e["fast_accesses"]), where=e["mem_accesses"] > 0)
        ax.plot(t, ratio, label=f"{r.policy} ({r.fast_ratio:.3f})",
                lw=2.2 if r.policy == "oracle" else 1.4,
                ls="--" if r.policy == "oracle" else "-")
    ax.set_xlabel("simulated time (ms)")
    ax.set_ylabel("fast-tier access ratio")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"{title}: fast-tier access ratio per epoch")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    p = os.path.join(out_dir, "fast_ratio.png")
    fig.savefig(p)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    for r in results:
        e = r.epochs
        t = np.cumsum(e["time_s"]) * 1e3
        mb = (e["promotions"] + e["demotions"]) * 4096 / 2**20
        ax.plot(t, np.cumsum(mb), label=f"{r.policy} ({r.migration_mb:.1f} MB)")
    ax.set_xlabel("simulated time (ms)")
    ax.set_ylabel("cumulative migration traffic (MB)")
    ax.grid(alpha=0.3)
    ax.set_title(f"{title}: migrations (promotions + demotions)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    p = os.path.join(out_dir, "migrations.png")
    fig.savefig(p)
    plt.close(fig)
    paths.append(p)
    return paths
