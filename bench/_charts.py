"""One PNG chart per benchmark of a `make bench` report (bench/run_all.py).

Above, every figure: its median as a bar, min–max over the rounds as a whisker, every round as
a dot (figures of different units share one log axis, each labelled with its unit). Below,
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
    with_ratio = [f for f in entry["figures"] if f["ratio"]]
    # "X vs B" figures repeat X's values once per baseline: show X's values once
    shown: dict[str, dict[str, Any]] = {}
    for f in entry["figures"]:
        shown.setdefault(f["name"].split(" vs ")[0], f)
    figures = list(shown.values())
    rows = [len(figures), *([len(with_ratio)] if with_ratio else [])]
    # one above the other, labels on the left: the labels are long, the bars need width
    fig, axes = plt.subplots(len(rows), 1, figsize=(11, 1.0 + 0.3 * sum(rows) + 0.6 * len(rows)),
                             squeeze=False, height_ratios=[r + 1.5 for r in rows])
    ax = axes[0][0]
    _bars(ax, [f"{name} [{f['unit']}]" for name, f in shown.items()], figures,
          [f["values"] for f in figures], "tab:blue")
    if all(f["min"] > 0 for f in figures):
        ax.set_xscale("log")
    ax.set_title("median, min–max and rounds", fontsize=9)
    if with_ratio:
        ax = axes[1][0]
        _bars(ax, [f["name"] if " vs " in f["name"]
                   else f"{f['name']} vs {f['baseline'] or 'baseline'}" for f in with_ratio],
              [f["ratio"] for f in with_ratio], [f["ratios"] for f in with_ratio],
              "tab:orange")
        for y, f in enumerate(with_ratio):
            if f["target"] is not None:
                ax.plot([f["target"]], [y], marker="|", markersize=14, markeredgewidth=2,
                        color="tab:green" if f["met"] else "tab:red")
        ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
        low = min(f["ratio"]["min"] for f in with_ratio)
        if low > 0 and max(f["ratio"]["max"] for f in with_ratio) / low > 20:
            ax.set_xscale("log")  # e.g. x0.9 of one baseline beside x40 of another
        ax.set_title("ratio to the same-run baseline (| target: green met, red not)",
                     fontsize=9)
    status = "" if entry["status"] == "ok" else f" — {entry['status']}: {entry['reason']}"
    fig.suptitle(f"{entry['script']}{status}", fontsize=10)
    fig.tight_layout()
    name = f"{entry['name']}.png"
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name
