"""Bash completion (packaging/completion/): one file per program, offering every option and
subcommand its argparse parser has, at every subcommand level; bash -n accepts each file.

The words each level must offer are read from the parsers here, independently of the
generator (tools/completion.py); bash itself is run to see what the completion offers.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPLETION_DIR = ROOT / "packaging" / "completion"


def _generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("completion", ROOT / "tools" / "completion.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["completion"] = module
    spec.loader.exec_module(module)
    return module


completion = _generator()
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def levels(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
           ) -> list[tuple[tuple[str, ...], set[str]]]:
    """(subcommand path, the option strings and subcommand names and positional choices
    offered there), for every level of the parser."""
    words: set[str] = set()
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                words.add(name)
                out += levels(sub, (*path, name))
        else:
            words.update(action.option_strings)
            if not action.option_strings and action.choices:
                words.update(map(str, action.choices))
    return [(path, words), *out]


def complete(program: str, words: list[str], cwd: Path) -> set[str]:
    """What bash offers after `program words...` (the last word is being completed)."""
    line = " ".join(f"'{w}'" for w in [program, *words])
    shell = (f"source {COMPLETION_DIR / program}\n"
             f"COMP_WORDS=({line}); COMP_CWORD={len(words)}\n"
             f"_{program.replace('-', '_')}\n"
             'printf "%s\\n" "${COMPREPLY[@]}"\n')
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", shell], cwd=cwd,
                          capture_output=True, text=True, timeout=30, check=True)
    return set(filter(None, done.stdout.splitlines()))


def test_every_program_has_a_completion_file_and_nothing_else_is_there() -> None:
    assert set(completion.PROGRAMS) == set(SCRIPTS)
    for program, target in SCRIPTS.items():
        assert target.split(":")[0] == completion.PROGRAMS[program]
    assert sorted(p.name for p in COMPLETION_DIR.iterdir()) == sorted(SCRIPTS)


@pytest.mark.parametrize("program", sorted(SCRIPTS))
def test_the_committed_file_is_what_its_parser_generates(program: str) -> None:
    assert (COMPLETION_DIR / program).read_text() == completion.generate(program), (
        f"packaging/completion/{program} is stale: run `make completion`")


@pytest.mark.parametrize("program", sorted(SCRIPTS))
def test_bash_parses_the_file(program: str) -> None:
    done = subprocess.run(["bash", "-n", str(COMPLETION_DIR / program)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("program", sorted(SCRIPTS))
def test_every_option_and_subcommand_is_offered_at_its_level(program: str,
                                                              tmp_path: Path) -> None:
    parser = completion.parser_of(program)
    for path, words in levels(parser):
        offered = complete(program, [*path, ""], tmp_path)  # an empty directory: no files
        assert words <= offered, f"{program} {' '.join(path)}: not offered {words - offered}"
        dashed = complete(program, [*path, "--"], tmp_path)
        assert {w for w in words if w.startswith("--")} <= dashed


def test_values_are_completed_from_choices_and_paths(tmp_path: Path) -> None:
    (tmp_path / "voucher.cbor").write_bytes(b"")
    assert complete("brski-voucher", ["sign", "--format", ""], tmp_path) == {"cms", "cose"}
    assert complete("brski-voucher", ["decode", "vou"], tmp_path) == {"voucher.cbor"}
    assert complete("joinproxyctl", ["--socket", "vo"], tmp_path) == {"voucher.cbor"}
    assert complete("joinproxyctl", ["window", "c"], tmp_path) == {"close"}
    assert complete("joinproxyctl", ["refusals", "--pledge", ""], tmp_path) == set()
    assert complete("joinproxyctl", ["w"], tmp_path) == {"window"}
