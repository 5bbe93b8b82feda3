"""The shipped Prometheus alert rules and Grafana dashboard (packaging/monitoring/).

- ``promtool check rules`` accepts both rule files, and ``promtool test rules`` runs the unit
  tests in tests/monitoring/ (input series -> the alerts that must, and must not, fire).
- Every dashboard query is valid PromQL (promtool checks it as a recording rule, Grafana's
  $variables replaced by values), and the dashboard's layout is sound.
- Every metric named by an alert or a dashboard query is exported: a real joinproxyd (with
  its XDP guard) and a real registrar and MASA run in a namespace lab, their /metrics are
  scraped, and each name used must be among the names declared there.

Grafana's own schema check is not run: no offline validator for dashboard JSON is packaged
in the registries this project installs from (see README, "Monitoring").
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_ipip_daemon import bpffs

from lab import Lab, Topology, wait_for
from lab.brski_services import REGISTRAR_PORT, Services, make_pki
from lab.proxyd import ProxyDaemon, base_config

__all__ = ["bpffs"]  # the fixture, shared with test_ipip_daemon

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "packaging" / "monitoring"
RULE_FILES = [MONITORING / "joinproxyd-alerts.yml", MONITORING / "brski-registrar-alerts.yml"]
RULE_TESTS = sorted((ROOT / "tests" / "monitoring").glob("*.test.yml"))
DASHBOARD = MONITORING / "joinproxyd-dashboard.json"
# Our metric names; `up` is Prometheus's own (one per scrape target), not an export of ours.
OUR_NAME = re.compile(r"\b(?:joinproxyd|brski)_[a-z0-9_]+\b")
PROMETHEUS_NAMES = {"up"}
SUFFIX = {"counter": "_total", "info": "_info"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: `make setup` installs Debian's prometheus package")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60,
                          check=False)


def alert_rules() -> list[dict[str, Any]]:
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"])
    return exprs


def names_used(exprs: Iterable[str]) -> set[str]:
    used: set[str] = set()
    for expr in exprs:
        used |= set(OUR_NAME.findall(expr))
        # any other selector `name{...}` must be Prometheus's own
        for name in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr):
            if not OUR_NAME.fullmatch(name):
                assert name in PROMETHEUS_NAMES, (name, expr)
    return used


def exported_names(text: str) -> set[str]:
    """The sample names a /metrics text declares: every family's, even one without samples
    yet (a labelled counter nobody incremented still has its # TYPE line)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        if family.type not in ("histogram", "summary"):  # those are queried by their samples
            names.add(family.name + SUFFIX.get(family.type, ""))
            names |= {sample.name for sample in family.samples}
        else:  # _bucket, _sum, _count, whether observed yet or not
            names |= {family.name + part for part in ("_bucket", "_sum", "_count")
                      if part != "_bucket" or family.type == "histogram"}
    return names


# ---------------------------------------------------------------- rules and dashboard, offline

def test_promtool_checks_the_shipped_rules() -> None:
    done = promtool("check", "rules", *map(str, RULE_FILES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(RULE_FILES), done.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    assert len(RULE_TESTS) == 2
    done = promtool("test", "rules", *map(str, RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_rule_unit_tests_can_fail(tmp_path: Path) -> None:
    """The unit tests see a broken rule: the same tests against rules whose `for:` of the
    listeners alert is longer fail (so `test rules` really evaluates the shipped rules)."""
    rules = tmp_path / "packaging" / "monitoring"
    rules.mkdir(parents=True)
    text = (MONITORING / "joinproxyd-alerts.yml").read_text()
    broken = text.replace("expr: joinproxyd_listeners_unbound > 0\n        for: 5m",
                          "expr: joinproxyd_listeners_unbound > 0\n        for: 15m")
    assert broken != text
    (rules / "joinproxyd-alerts.yml").write_text(broken)
    tests = tmp_path / "tests" / "monitoring"
    tests.mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "monitoring" / "joinproxyd-alerts.test.yml", tests)
    done = promtool("test", "rules", str(tests / "joinproxyd-alerts.test.yml"))
    assert done.returncode != 0
    assert "JoinproxydListenersUnbound" in done.stdout + done.stderr


def test_every_alert_has_severity_summary_and_description() -> None:
    rules = alert_rules()
    assert len(rules) >= 15
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), names
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert len(rule["annotations"]["description"]) > 40, rule["alert"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    board = dashboard()
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    concrete = [e.replace("$__rate_interval", "5m").replace("$job", "joinproxyd")
                .replace("$instance", ".*").replace("$registrar_job", "brski-registrar")
                .replace("$masa_job", "brski-masa") for e in exprs]
    assert not any("$" in e for e in concrete), concrete
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(concrete)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_layout() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in board["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
    variables = {v["name"] for v in board["templating"]["list"]}
    for expr in dashboard_queries(board):
        for var in re.findall(r"\$(\w+)", expr):
            assert var.startswith("__") or var in variables, (var, expr)


def test_names_used_sees_a_misspelling() -> None:
    assert names_used(['rate(joinproxyd_drop_total{mode="x"}[5m])']) == {"joinproxyd_drop_total"}
    with pytest.raises(AssertionError):
        names_used(['foo_bar{job="x"}'])


# ---------------------------------------------------------------- against the real exporters

@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=1, registrars=1), log_dir=tmp_path / "logs") as lab:
        yield lab


def scrape(host: Any, address: str) -> str:
    return host.run(["curl", "-sf", f"http://{address}/metrics"]).stdout


@pytest.mark.netns
def test_every_metric_named_is_exported(lab: Lab, bpffs: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", ["mon-0"])
    services = Services(lab.registrars[0], pki, tmp_path / "r0",
                        registrar_listen=[f"[fd4a:5044::100]:{REGISTRAR_PORT}"],
                        announce_interfaces=[])
    exporters = {"registrar": "[::1]:9466", "masa": "[::1]:9467"}
    for name, address in exporters.items():
        toml = services.tomls[name]
        toml.write_text(toml.read_text() + f'\n[metrics]\nlisten = "{address}"\n')
    daemon = ProxyDaemon(lab, tmp_path / "proxy", base_config(
        tmp_path / "proxy", daemon={"bpf_pin_dir": str(bpffs / "joinproxyd")},
        guard={"enabled": True}))
    try:
        services.start()
        daemon.start()
        wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
        proxy_text = scrape(lab.proxy, daemon.config["metrics"]["listen"])
        exported = exported_names(proxy_text)
        for address in exporters.values():
            exported |= exported_names(scrape(lab.registrars[0], address))
    finally:
        if daemon.process is not None:
            daemon.stop()
        services.stop()

    # the scrape is of the real thing: the guard ran, and both services answered
    assert {"joinproxyd_guard_running", "joinproxyd_bpf_packets_total",
            "brski_registrar_refusals_total", "brski_masa_refusals_total"} <= exported

    used_by_rules = names_used(r["expr"] for r in alert_rules())
    used_by_board = names_used(dashboard_queries(dashboard()))
    assert len(used_by_rules) >= 10 and len(used_by_board) >= 14
    assert used_by_rules - exported == set()
    assert used_by_board - exported == set()
    # and the dashboard shows every family the daemon and the services export
    ours = {n for n in exported if OUR_NAME.fullmatch(n)}
    assert ours - used_by_board == set()
