"""`make bench`'s report (bench/run_all.py, bench/_report.py): its schema, its runner, the
README's summary markers, and a smoke run.

The smoke run is the only benchmark run in `make test`: every benchmark of a representative
subset once with its smallest settings (``--quick``), checked for a well-formed report, a PNG
chart each and a summary table; never for how fast anything was. The subset leaves out
relay_throughput, cojp_joins and enroll_cluster, the three slowest in quick mode (about 16,
26 and 56 s here); their own smoke tests (test_bench_smoke.py, test_bench_cojp_joins_smoke.py,
test_bench_cluster_smoke.py) run them with --quick.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import _report  # noqa: E402  (bench/ is a folder of scripts)
import run_all  # noqa: E402

SMOKE = ("voucher_sign_verify", "jpy_seal_open", "cbor_decode", "masa_vouchers",
         "dtls_handshake", "jpy_relay", "cojp_relay", "coaps_relay", "jpy_kernel_pps",
         "ipip_pps", "enroll_rate")
HEADER = ("| benchmark | figure | median (min–max) | unit | n "
          "| against (same run), median (min–max) | ratio median (min–max) | target | met |")


def report_of(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"schema": _report.SCHEMA, "quick": True, "started": "2026-12-07T14:00:00+00:00",
            "host": {"cpus": 2, "commit": "abc", "load_start": [1.0, 1, 1],
                     "load_end": [2.0, 2, 2]},
            "benchmarks": list(entries)}


def entry(name: str, figures: list[dict[str, Any]], status: str = "ok",
          reason: str | None = None) -> dict[str, Any]:
    return {"name": name, "script": f"bench/{name}.py", "status": status, "reason": reason,
            "figures": figures}


# -- recording figures --------------------------------------------------------------------------

@pytest.fixture
def recording(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    out = tmp_path / "figures.json"
    monkeypatch.setenv(_report.ENV, str(out))
    monkeypatch.setattr(_report, "_figures", [])
    return out


def test_record_pairs_rounds_with_the_baseline_and_judges_the_target(recording: Path) -> None:
    _report.record("bare", [100, 200, 400], "ops/s")
    _report.record("ours", [50, 150, 100], "ops/s", baseline="bare", target=0.5)
    _report.record("cost", [3.0, 1.0, 2.0], "µs", target=2.5, better="lower")
    figures = {f["name"]: f for f in json.loads(recording.read_text())["figures"]}
    ours = figures["ours"]
    assert ours["ratios"] == [0.5, 0.75, 0.25]
    assert ours["ratio"] == {"median": 0.5, "min": 0.25, "max": 0.75, "n": 3}
    assert (ours["median"], ours["min"], ours["max"], ours["n"]) == (100, 50, 150, 3)
    assert ours["met"] is True
    assert figures["cost"]["met"] is True  # lower is better: 2.0 <= 2.5
    assert figures["bare"]["ratio"] is None and figures["bare"]["met"] is None
    assert _report.check_figure("t", ours) == []


def test_record_unmet_target_and_explicit_ratios(recording: Path) -> None:
    _report.record("a", [10.0], "x/s", baseline="elsewhere", ratios=[0.4, 0.6, 0.5], target=0.8)
    (fig,) = json.loads(recording.read_text())["figures"]
    assert fig["ratio"]["median"] == 0.5 and fig["met"] is False


def test_record_with_a_baseline_but_no_ratio_judges_nothing(recording: Path) -> None:
    # a ratio that could not be measured (ipip_pps prints "n/a") is not judged on the value
    _report.record("a", [10.0], "x/s", baseline="b", ratios=[], target=0.8)
    (fig,) = json.loads(recording.read_text())["figures"]
    assert fig["ratios"] is None and fig["met"] is None
    assert _report.check_figure("t", fig) == []


def test_record_drops_non_finite_values(recording: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    _report.record("per flow", float("nan"), "bytes")
    _report.record("mixed", [1.0, float("inf"), 3.0], "x")
    assert [f["name"] for f in json.loads(recording.read_text())["figures"]] == ["mixed"]
    assert json.loads(recording.read_text())["figures"][0]["values"] == [1.0, 3.0]
    assert "per flow: no finite value" in capsys.readouterr().err


def test_record_refuses_an_unknown_baseline_and_a_bad_direction(recording: Path) -> None:
    with pytest.raises(ValueError, match="not recorded first"):
        _report.record("ours", [1.0], "x", baseline="never")
    with pytest.raises(ValueError, match="better"):
        _report.record("ours", [1.0], "x", better="faster")


def test_record_is_a_no_op_outside_the_runner(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_report.ENV, raising=False)
    monkeypatch.setattr(_report, "_figures", [])
    _report.record("a", [1.0], "x", baseline="not checked either")
    assert _report._figures == [] and list(tmp_path.iterdir()) == []


def test_merge_concatenates_repeated_runs() -> None:
    one = [_report.figure("b", 10, "x"), _report.figure("a", 5, "x", ratios=[0.5], target=0.6)]
    two = [_report.figure("b", 30, "x"), _report.figure("a", 21, "x", ratios=[0.7], target=0.6)]
    merged = {f["name"]: f for f in _report.merge([one, two])}  # type: ignore[list-item]
    assert merged["b"]["values"] == [10, 30] and merged["b"]["median"] == 20
    assert merged["a"]["ratios"] == [0.5, 0.7] and merged["a"]["ratio"]["median"] == 0.6
    assert merged["a"]["met"] is True
    assert one[1] is not None and one[1]["values"] == [5]  # the inputs are left alone


# -- the report's schema ------------------------------------------------------------------------

def good_figure() -> dict[str, Any]:
    fig = _report.figure("ours", [1.0, 2.0, 3.0], "ops/s", baseline="bare",
                         ratios=[0.5, 0.6, 0.7], target=0.55)
    assert fig is not None
    return fig


def test_check_report_accepts_a_good_report() -> None:
    report = report_of(entry("one", [good_figure()]),
                       entry("two", [], status="failed", reason="exit status 1"),
                       entry("three", [], status="skipped", reason="needs root"))
    assert _report.check_report(report) == []


@pytest.mark.parametrize(("damage", "complaint"), [
    (lambda r: r.pop("host"), "host missing"),
    (lambda r: r.update(schema=2), "schema"),
    (lambda r: r.update(benchmarks=[]), "no benchmarks"),
    (lambda r: r["benchmarks"].append(r["benchmarks"][0]), "listed twice"),
    (lambda r: r["benchmarks"][0].update(status="fine"), "status"),
    (lambda r: r["benchmarks"][0].update(figures=[]), "ok without a figure"),
    (lambda r: r["benchmarks"][0].update(status="failed"), "failed without a reason"),
    (lambda r: r["benchmarks"][0]["figures"][0].update(median=99.0), "median"),
    (lambda r: r["benchmarks"][0]["figures"][0].update(values=[1.0, "2"]), "finite"),
    (lambda r: r["benchmarks"][0]["figures"][0].pop("unit"), "unit"),
    (lambda r: r["benchmarks"][0]["figures"][0].update(met=None), "met is not given"),
    (lambda r: r["benchmarks"][0]["figures"][0].update(target=None), "met is True"),
    (lambda r: r["benchmarks"][0]["figures"][0]["ratio"].update(max=0.1), "ratio: max"),
    (lambda r: r["benchmarks"][0]["figures"][0].update(better="more"), "better"),
    (lambda r: r["benchmarks"][0]["figures"].append(good_figure()), "twice"),
])
def test_check_report_finds_what_is_wrong(damage: Any, complaint: str) -> None:
    report = report_of(entry("one", [good_figure()]))
    damage(report)
    problems = _report.check_report(report)
    assert any(complaint in p for p in problems), problems


# -- the runner ---------------------------------------------------------------------------------

def fake_bench(tmp_path: Path, name: str, body: str, **kw: Any) -> run_all.Bench:
    script = tmp_path / f"{name}.py"
    script.write_text("import sys, time\n"
                      f"sys.path.insert(0, {str(REPO / 'bench')!r})\n"
                      "from _report import record\n" + body)
    return run_all.Bench(name, script=script, **kw)


def test_runner_records_a_crash_and_keeps_what_was_measured(tmp_path: Path) -> None:
    bench = fake_bench(tmp_path, "crash", "record('before', [1.0, 2.0], 'x/s')\n"
                                          "raise RuntimeError('half-way')\n")
    got = run_all.run_one(bench, quick=False, logs=tmp_path)
    assert got["status"] == "failed" and "exit status 1" in got["reason"]
    assert [f["name"] for f in got["figures"]] == ["before"]
    assert "RuntimeError: half-way" in (tmp_path / "crash.log").read_text()


def test_runner_fails_a_benchmark_that_records_nothing(tmp_path: Path) -> None:
    bench = fake_bench(tmp_path, "silent", "print('fast!')\n")
    got = run_all.run_one(bench, quick=True, logs=tmp_path)
    assert got["status"] == "failed" and "no figure" in got["reason"]


def test_runner_stops_an_overrunning_benchmark_with_sigint_first(tmp_path: Path) -> None:
    bench = fake_bench(tmp_path, "slow", "record('first', 1.0, 'x')\n"
                                         "try:\n    time.sleep(60)\n"
                                         "except KeyboardInterrupt:\n"
                                         "    print('cleaned up', flush=True)\n    raise\n",
                       timeout=3)
    got = run_all.run_one(bench, quick=False, logs=tmp_path)
    assert got["status"] == "failed" and "timed out after 3 s" in got["reason"]
    assert "cleaned up" in (tmp_path / "slow.log").read_text()


def test_runner_repeats_and_merges_a_one_shot_benchmark(tmp_path: Path) -> None:
    bench = fake_bench(tmp_path, "once", "import random\nb = random.uniform(10, 20)\n"
                                         "record('bare', b, 'x')\n"
                                         "record('ours', b / 2, 'x', baseline='bare')\n",
                       repeat=3)
    got = run_all.run_one(bench, quick=False, logs=tmp_path)
    assert got["status"] == "ok", got
    ours = {f["name"]: f for f in got["figures"]}["ours"]
    assert ours["n"] == 3 and ours["ratios"] == pytest.approx([0.5] * 3)
    assert _report.check_report(report_of(got)) == []
    assert run_all.run_one(bench, quick=True, logs=tmp_path)["figures"][0]["n"] == 1


def test_every_benchmark_is_run_and_records_its_figures() -> None:
    scripts = {p.stem for p in (REPO / "bench").glob("[a-z]*.py")} - {"run_all"}
    assert {b.name for b in run_all.BENCHES} == scripts
    for name in scripts:
        assert "from _report import record" in (REPO / "bench" / f"{name}.py").read_text(), name
    assert set(SMOKE) <= scripts


def test_runner_refuses_an_unknown_benchmark() -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "run_all.py"), "--only",
                           "jpy_relay,warp_drive"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2 and "no benchmark warp_drive" in done.stderr


# -- the summary and the README -----------------------------------------------------------------

def table_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert rows and rows[0] == HEADER, rows[:1]
    assert re.fullmatch(r"(\|---)+\|", rows[1]), rows[1]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]
    for row in cells:
        assert len(row) == HEADER.count("|") - 1, row
    return cells


def test_summary_folds_baselines_and_lists_failures() -> None:
    bare = _report.figure("bare", [4.0, 8.0], "x/s")
    ours = _report.figure("ours", [2.0, 6.0], "x/s", ratios=[0.5, 0.75], target=0.8)
    assert bare and ours
    ours["baseline"] = "bare"
    text = run_all.summary(report_of(entry("one", [bare, ours]),
                                     entry("two", [], status="failed", reason="exit status 3")))
    assert "depend on the machine" in text and "noisy" not in text  # load 1-2 on 2 CPUs
    rows = table_rows(text)
    assert rows[0] == ["`one`", "ours", "4.00 (2.00–6.00)", "x/s", "2", "bare 6.00 (4.00–8.00)",
                       "×0.625 (0.500–0.750)", "≥ 0.8×", "no"]
    assert rows[1][:2] == ["`two`", "**failed**: exit status 3"]


def test_summary_says_when_other_work_competed_and_carries_the_note() -> None:
    bare = _report.figure("bare", [4.0], "x/s")
    assert bare
    report = report_of(entry("one", [bare]))
    report["host"]["load_start"] = [7.5, 5, 3]
    report["note"] = "five other builds ran"
    text = run_all.summary(report)
    assert ("load 7.5 at the start (2.0 at the end, the benchmarks' own included) (five other "
            "builds ran)") in text
    assert "Other work competed for the CPUs" in text and "noisy" in text
    assert table_rows(text)[0][:3] == ["`one`", "bare", "4.00"]  # no comparison: its own row


def test_a_high_load_at_the_end_alone_is_the_benchmarks_own() -> None:
    """The last benchmark's processes raise the load the runner reads at the end: that is
    no sign of other work, which only the load before the first benchmark shows."""
    bare = _report.figure("bare", [4.0], "x/s")
    assert bare
    report = report_of(entry("one", [bare]))
    report["host"]["load_end"] = [7.5, 5, 3]
    text = run_all.summary(report)
    assert "Other work competed" not in text and "depend on the machine" in text


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    assert text.count(run_all.START) == 1 and text.count(run_all.END) == 1
    start, end = text.index(run_all.START), text.index(run_all.END)
    assert start < end
    assert text.rfind("\n## ", 0, start) == text.index("\n## Benchmarks")  # in Benchmarks
    return text[start + len(run_all.START):end]


def test_readme_embeds_a_well_formed_summary() -> None:
    section = readme_section()
    assert section.lstrip().startswith("Measured by `make bench`")
    rows = table_rows(section)
    assert {row[0] for row in rows} <= {f"`{b.name}`" for b in run_all.BENCHES}
    # rewriting with the same table changes nothing
    readme = REPO / "README.md"
    assert run_all.rewrite_readme(readme, section.strip("\n")) == readme.read_text()


def test_readme_rewrite_replaces_only_between_the_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{run_all.START}\nold\n{run_all.END}\nafter\n")
    assert run_all.rewrite_readme(readme, "| new |\n") == (
        f"# x\n\nbefore\n{run_all.START}\n| new |\n{run_all.END}\nafter\n")
    for broken in (f"{run_all.END}\n{run_all.START}\n", f"{run_all.START}\n",
                   f"{run_all.START}{run_all.END}{run_all.START}{run_all.END}"):
        readme.write_text(broken)
        with pytest.raises(SystemExit, match="exactly one"):
            run_all.rewrite_readme(readme, "| new |\n")


# -- the smoke run --------------------------------------------------------------------------------

@pytest.mark.netns
def test_quick_run_of_a_subset_writes_a_well_formed_report(as_root: None,
                                                           tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "run_all.py"), "--quick",
                           "--only", ",".join(SMOKE), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=280, check=False, cwd=REPO)
    logs = {p.name: p.read_text()[-1500:] for p in (tmp_path / "logs").glob("*.log")}
    assert done.returncode == 0, (done.stdout, done.stderr, logs)
    report = json.loads((tmp_path / "report.json").read_text())
    assert _report.check_report(report) == []
    assert report["quick"] is True
    assert [b["name"] for b in report["benchmarks"]] == list(SMOKE)
    for bench in report["benchmarks"]:
        assert bench["status"] == "ok" and bench["figures"], bench
        assert any(f["ratio"] for f in bench["figures"]), f"{bench['name']}: no baseline"
        png = tmp_path / bench["chart"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    summary = (tmp_path / "summary.md").read_text()
    assert "Quick mode, tiny rounds" in summary
    assert {row[0] for row in table_rows(summary)} == {f"`{n}`" for n in SMOKE}
    assert os.environ.get(_report.ENV) is None  # the runner sets it for its children only
