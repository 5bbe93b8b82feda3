"""One PNG chart per benchmark of a `make bench` report (bench/run_all.py).

Left, every figure: its median as a bar, min–max over the rounds as a whisker, every round as
a dot (figures of different units share one log axis, each labelled with its unit). Right,
when the benchmark has baselines: the ratio against the same-run baseline the same way, with
the target as a mark, green where met and red where not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt  # after use(): the backend must be chosen first


def _bars(ax: Any, labels: list[str], spreads: list[dict[str, Any]],
          rounds: list[list[float]], color: str) -> None:
    ys = list(range(len(labels)))
    med = [s["median"] for s in spreads]
    err = [[m - s["min"] for m, s in zip(med, spreads, strict=True)],
           [s["max"] - m for m, s in zip(med, spreads, strict=True)]]
    ax.barh(ys, med, xerr=err, color=color, alpha=0.6, capsize=3, ecolor="black")
    for y, values in zip(ys, rounds, strict=True):
        ax.plot(values, [y] * len(values), "k.", markersize=3)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.invert_yaxis()


def draw(entry: dict[str, Any], out: Path) -> str:
    """Write OUT/NAME.png for one benchmark's entry; returns the file's name."""
    figures = entry["figures"]
    with_ratio = [f for f in figures if f["ratio"]]
    panels = 2 if with_ratio else 1
    height = 1.2 + 0.32 * max(len(figures), len(with_ratio))
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, height), squeeze=False)
    ax = axes[0][0]
    _bars(ax, [f"{f['name']} [{f['unit']}]" for f in figures], figures,
          [f["values"] for f in figures], "tab:blue")
    if all(f["min"] > 0 for f in figures):
        ax.set_xscale("log")
    ax.set_title("median, min–max and rounds", fontsize=9)
    if with_ratio:
        ax = axes[0][1]
        _bars(ax, [f"{f['name']} / {f['baseline'] or 'baseline'}" for f in with_ratio],
              [f["ratio"] for f in with_ratio], [f["ratios"] for f in with_ratio],
              "tab:orange")
        for y, f in enumerate(with_ratio):
            if f["target"] is not None:
                ax.plot([f["target"]], [y], marker="|", markersize=14, markeredgewidth=2,
                        color="tab:green" if f["met"] else "tab:red")
        ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title("ratio to the same-run baseline (| = target)", fontsize=9)
        ax.yaxis.tick_right()
    status = "" if entry["status"] == "ok" else f" — {entry['status']}: {entry['reason']}"
    fig.suptitle(f"{entry['script']}{status}", fontsize=10)
    fig.tight_layout()
    name = f"{entry['name']}.png"
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name
