"""The protocol library does no I/O and reads no hidden clock (design.md, habit 1).

Every module of the `brski` package except the command-line front ends in `brski.cli` is
parsed, and importing socket, asyncio, selectors, time or random, or touching os.environ,
fails the test with the module and line.
"""

import ast
from pathlib import Path

import brski

FORBIDDEN = {"socket", "asyncio", "selectors", "time", "random", "subprocess"}
ROOT = Path(brski.__file__).parent


def library_modules() -> list[Path]:
    return [p for p in ROOT.rglob("*.py") if "cli" not in p.relative_to(ROOT).parts]


def violations(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            if name.split(".")[0] in FORBIDDEN:
                found.append(f"{path.name}:{node.lineno} imports {name}")
        if (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")
                and isinstance(node.value, ast.Name) and node.value.id == "os"):
            found.append(f"{path.name}:{node.lineno} reads os.{node.attr}")
    return found


def test_library_has_modules():
    assert len(library_modules()) >= 3


def test_no_io_or_clock_imports_in_the_protocol_library():
    problems = [v for path in library_modules() for v in violations(path)]
    assert problems == []


def test_the_checker_catches_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import time\nimport os\nx = os.environ['A']\nfrom socket import socket\n")
    assert len(violations(bad)) == 3
