"""Every program answers --version with its name and the project's version and exits 0
(issue 11, defect 9d), and brski-registrar's usage names --ipip (9c). The entry points are
read from pyproject.toml, so a program added there is covered without editing this test."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SCRIPTS = PROJECT["scripts"]


def run_entry_point(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `module:function` with argv as the installed script would (a fresh interpreter,
    sys.argv set), without depending on the scripts being on PATH."""
    module, function = target.split(":")
    code = (f"import sys; sys.argv[0] = {module!r}; from {module} import {function} as f; "
            f"sys.exit(f())")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_every_entry_point_is_listed():
    assert set(SCRIPTS) >= {"joinproxyd", "joinproxyctl", "brski-registrar", "brski-masa",
                            "brski-pki", "brski-voucher", "pledge-sim", "joinproxy-lab"}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_version(name: str):
    done = run_entry_point(SCRIPTS[name], "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{name} {PROJECT['version']}", done.stdout + done.stderr


def test_registrar_usage_names_ipip():
    done = run_entry_point(SCRIPTS["brski-registrar"], "--help")
    assert done.returncode == 0, done.stderr
    usage = done.stdout.split("\n\n")[0]
    assert "[--ipip]" in usage, usage
    assert "--ipip" in done.stdout.split("options:")[1]


def test_registrar_refuses_an_unknown_switch_and_names_it():
    done = run_entry_point(SCRIPTS["brski-registrar"], "--config", "x.toml", "--ipipp")
    assert done.returncode == 2
    assert "unrecognized arguments: --ipipp" in done.stderr
