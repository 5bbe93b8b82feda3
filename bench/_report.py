"""The figures a benchmark records for `make bench` (bench/run_all.py), and the report's schema.

A benchmark calls ``record()`` once per figure it prints, after it printed it. When the
environment names a file in ``BENCH_REPORT`` (the runner sets it), every call rewrites that
file with the figures so far, so a benchmark that crashes half-way still leaves what it had
measured; without it, ``record()`` does nothing and the benchmark behaves as before.

A figure is a name, a unit and one value per round; against a baseline measured in the same
run it also carries one ratio per round (``baseline``'s value of the same round, unless the
benchmark pairs them itself and passes ``ratios``), and the target that ratio must meet, if
any. The runner merges repeated invocations of one benchmark by concatenating the rounds.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ENV = "BENCH_REPORT"
SCHEMA = 1
BETTER = ("higher", "lower")
STATUSES = ("ok", "failed", "skipped")

_figures: list[dict[str, Any]] = []


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """Median, min and max over the rounds, and how many rounds."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def _finite(values: float | Iterable[float]) -> list[float]:
    items = [values] if isinstance(values, int | float) else list(values)
    return [float(v) for v in items if math.isfinite(float(v))]


def figure(name: str, values: float | Iterable[float], unit: str, *,
           baseline: str | None = None, ratios: Iterable[float] | None = None,
           target: float | None = None, better: str = "higher") -> dict[str, Any] | None:
    """One figure as the report holds it, or None when no round gave a finite value (a
    benchmark's NaN, e.g. a per-flow cost with no flow, is no figure)."""
    if better not in BETTER:
        raise ValueError(f"better must be one of {BETTER}, not {better!r}")
    rounds = _finite(values)
    if not rounds:
        return None
    out: dict[str, Any] = {"name": name, "unit": unit, "values": rounds, **spread(rounds),
                           "better": better, "baseline": baseline, "ratios": None,
                           "target": target, "met": None}
    if ratios is not None:
        out["ratios"] = _finite(ratios) or None
    elif baseline is not None:
        base = next((f for f in _figures if f["name"] == baseline), None)
        if base is None:
            raise ValueError(f"baseline {baseline!r} of {name!r} was not recorded first")
        if len(base["values"]) == len(rounds):  # measured round by round: pair them
            out["ratios"] = [v / b for v, b in zip(rounds, base["values"], strict=True) if b]
        elif base["median"]:
            out["ratios"] = [statistics.median(rounds) / base["median"]]
    return _judge(out)


def _judge(fig: dict[str, Any]) -> dict[str, Any]:
    """Ratio spread, and whether the target is met: by the median ratio where there is a
    baseline, else by the median value."""
    fig["ratio"] = spread(fig["ratios"]) if fig["ratios"] else None
    fig["met"] = None  # also when a baseline gave no ratio: then nothing can be judged
    if fig["target"] is not None and (fig["ratio"] or fig["baseline"] is None):
        got = fig["ratio"]["median"] if fig["ratio"] else fig["median"]
        fig["met"] = got >= fig["target"] if fig["better"] == "higher" else got <= fig["target"]
    return fig


def record(name: str, values: float | Iterable[float], unit: str, *,
           baseline: str | None = None, ratios: Iterable[float] | None = None,
           target: float | None = None, better: str = "higher") -> None:
    """Record one figure of this benchmark run (see figure()); a no-op outside the runner."""
    path = os.environ.get(ENV)
    if not path:
        return
    fig = figure(name, values, unit, baseline=baseline, ratios=ratios, target=target,
                 better=better)
    if fig is None:
        print(f"bench report: {name}: no finite value, not recorded", file=sys.stderr)
        return
    _figures[:] = [f for f in _figures if f["name"] != name] + [fig]
    _write(Path(path), {"schema": SCHEMA, "figures": _figures})


def _write(path: Path, doc: dict[str, Any]) -> None:
    """Atomically: the runner never reads half a file."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False,
                                     prefix=path.name, suffix=".tmp") as out:
        json.dump(doc, out, indent=1, allow_nan=False)
    os.replace(out.name, path)


def merge(runs: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The figures of repeated invocations of one benchmark, rounds concatenated in order."""
    merged: dict[str, dict[str, Any]] = {}
    for figures in runs:
        for fig in figures:
            have = merged.get(fig["name"])
            if have is None:
                merged[fig["name"]] = {**fig, "values": list(fig["values"]),
                                       "ratios": list(fig["ratios"] or []) or None}
                continue
            have["values"] += fig["values"]
            if fig["ratios"]:
                have["ratios"] = (have["ratios"] or []) + list(fig["ratios"])
    for fig in merged.values():
        fig.update(spread(fig["values"]))
        _judge(fig)
    return list(merged.values())


# -- the report's schema (bench/run_all.py writes it; tests/test_bench_report.py checks it) --

def _check_spread(where: str, got: Any, values: list[float], problems: list[str]) -> None:
    if not isinstance(got, dict):
        problems.append(f"{where}: no spread")
        return
    if not values:
        problems.append(f"{where}: no rounds")
        return
    want = spread(values)
    for key, value in want.items():
        if not isinstance(got.get(key), int | float) or not math.isclose(got[key], value):
            problems.append(f"{where}: {key} is {got.get(key)!r}, the rounds give {value!r}")


def check_figure(bench: str, fig: Any) -> list[str]:
    if not isinstance(fig, dict):
        return [f"{bench}: a figure is not an object"]
    where = f"{bench}/{fig.get('name')!r}"
    problems: list[str] = []
    for key, kind in (("name", str), ("unit", str), ("values", list), ("better", str)):
        if not isinstance(fig.get(key), kind):
            problems.append(f"{where}: {key} missing or not {kind.__name__}")
    if problems:
        return problems
    values = fig["values"]
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        problems.append(f"{where}: a value is not a finite number")
        return problems
    _check_spread(where, fig, values, problems)
    if fig["better"] not in BETTER:
        problems.append(f"{where}: better is {fig['better']!r}")
    ratios = fig.get("ratios")
    if ratios is not None:
        if not isinstance(ratios, list) or not all(
                isinstance(v, int | float) and math.isfinite(v) for v in ratios):
            problems.append(f"{where}: ratios are not finite numbers")
        else:
            _check_spread(f"{where} ratio", fig.get("ratio"), ratios, problems)
    target = fig.get("target")
    if target is not None and not isinstance(target, int | float):
        problems.append(f"{where}: target {target!r} is not a number")
    met = fig.get("met")
    if met is not None and (target is None or not isinstance(met, bool)):
        problems.append(f"{where}: met is {met!r} with target {target!r}")
    if target is not None and met is None and (ratios or fig.get("baseline") is None):
        problems.append(f"{where}: a target that can be judged but met is not given")
    return problems


def check_report(report: Any) -> list[str]:
    """What is wrong with a report (an empty list when it is well-formed)."""
    if not isinstance(report, dict):
        return ["the report is not an object"]
    problems = []
    if report.get("schema") != SCHEMA:
        problems.append(f"schema is {report.get('schema')!r}, not {SCHEMA}")
    for key in ("started", "host", "benchmarks"):
        if key not in report:
            problems.append(f"{key} missing")
    benches = report.get("benchmarks")
    if not isinstance(benches, list) or not benches:
        return [*problems, "no benchmarks"]
    names = set()
    for bench in benches:
        if not isinstance(bench, dict) or not isinstance(bench.get("name"), str):
            problems.append("a benchmark without a name")
            continue
        name = bench["name"]
        if name in names:
            problems.append(f"{name}: listed twice")
        names.add(name)
        if bench.get("status") not in STATUSES:
            problems.append(f"{name}: status {bench.get('status')!r}")
        figures = bench.get("figures")
        if not isinstance(figures, list):
            problems.append(f"{name}: figures is not a list")
            continue
        if bench.get("status") == "ok" and not figures:
            problems.append(f"{name}: ok without a figure")
        if bench.get("status") != "ok" and not bench.get("reason"):
            problems.append(f"{name}: {bench.get('status')} without a reason")
        seen = set()
        for fig in figures:
            problems += check_figure(name, fig)
            if isinstance(fig, dict):
                if fig.get("name") in seen:
                    problems.append(f"{name}: figure {fig.get('name')!r} twice")
                seen.add(fig.get("name"))
                base = fig.get("baseline")
                if base is not None and (not isinstance(base, str) or not base):
                    problems.append(f"{name}/{fig.get('name')!r}: baseline {base!r}")
    return problems
