"""What ``pledge-sim enroll`` prints: a table for people, JSON for programs."""

from __future__ import annotations

import json
from collections.abc import Sequence

from .runner import EnrollResult

COLUMNS = ("serial", "proxy", "discovery", "voucher", "LDevID subject", "seconds", "result")


def _row(r: EnrollResult) -> tuple[str, ...]:
    return (r.serial, r.proxy, r.method, r.assertion, r.ldevid_subject, f"{r.seconds:.2f}",
            "ok" if r.ok else f"FAILED ({r.code})")


def table(results: Sequence[EnrollResult], elapsed: float) -> str:
    rows = [COLUMNS, *(_row(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    failed = [r for r in results if not r.ok]
    for r in failed:
        lines.append(f"{r.serial}: {r.reason}")
    lines.append(summary(results, elapsed))
    return "\n".join(lines)


def summary(results: Sequence[EnrollResult], elapsed: float) -> str:
    ok = sum(r.ok for r in results)
    rate = ok / elapsed if elapsed > 0 else 0.0
    return (f"{ok} enrolled, {len(results) - ok} failed in {elapsed:.2f} s "
            f"({rate:.1f} enrollments/s)")


def to_json(results: Sequence[EnrollResult], elapsed: float) -> str:
    ok = sum(r.ok for r in results)
    doc = {"enrolled": ok, "failed": len(results) - ok, "seconds": round(elapsed, 3),
           "results": [r.to_json() for r in results]}
    return json.dumps(doc, indent=2)
