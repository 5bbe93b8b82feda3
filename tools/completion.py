"""Bash completion for every command-line program, written from their argparse parsers.

    .venv/bin/python tools/completion.py packaging/completion    (make completion)

One file per program, named as the program (what bash-completion's on-demand loader looks
for in /usr/share/bash-completion/completions/). The files are committed: packages ship
them as they are, nothing is generated on the target. tests/test_completion.py regenerates
them and fails if a parser gained an option or subcommand the committed file lacks.

The parsers are taken from each program's own main(): ArgumentParser.parse_args is replaced,
while main() runs, by one that hands the parser back instead of parsing, so this file never
repeats a program's options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

# program -> the module whose main() builds its parser (pyproject.toml [project.scripts])
PROGRAMS = {
    "joinproxyd": "joinproxyd.cli",
    "joinproxyctl": "joinproxyd.ctl",
    "brski-registrar": "registrar.cli",
    "brski-masa": "registrar.masa_cli",
    "brski-sztp": "registrar.sztp_cli",
    "brski-pki": "brski.cli.pki",
    "brski-voucher": "brski.cli.voucher",
    "pledge-sim": "pledge_sim.cli",
    "joinproxy-lab": "lab.cli",
}


class _Parser(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def parser_of(program: str) -> argparse.ArgumentParser:
    """The parser `program`'s main() builds (main is stopped at its parse_args)."""
    module = importlib.import_module(PROGRAMS[program])

    def hand_back(self: argparse.ArgumentParser, *_args: object, **_kw: object) -> None:
        raise _Parser(self)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = hand_back  # type: ignore[assignment,method-assign]
    try:
        module.main([])
    except _Parser as found:
        return found.parser
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    raise RuntimeError(f"{program}: main() returned without parsing its arguments")


@dataclass
class Level:
    """What one (sub)command takes: its options, its subcommands, and what their values are."""

    options: list[str] = field(default_factory=list)
    subcommands: dict[str, Level] = field(default_factory=dict)
    choices: list[str] = field(default_factory=list)  # positional values offered as words
    files: bool = False  # a positional is a path
    option_files: list[str] = field(default_factory=list)  # options whose value is a path
    option_choices: dict[str, list[str]] = field(default_factory=dict)
    option_values: list[str] = field(default_factory=list)  # other options taking a value


def describe(parser: argparse.ArgumentParser) -> Level:
    level = Level()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                level.subcommands[name] = describe(sub)
            continue
        takes_path = action.type is Path or (action.metavar or "") in ("FILE", "DIR")
        if not action.option_strings:
            if action.choices:
                level.choices += [str(c) for c in action.choices]
            elif takes_path:
                level.files = True
            continue
        level.options += action.option_strings
        if action.nargs == 0:
            continue
        if action.choices:
            for option in action.option_strings:
                level.option_choices[option] = [str(c) for c in action.choices]
        elif takes_path:
            level.option_files += action.option_strings
        else:
            level.option_values += action.option_strings
    return level


def _words(words: list[str]) -> str:
    return " ".join(words)


# mapfile rather than COMPREPLY=($(...)): no word splitting or globbing of what compgen says
FILES = 'mapfile -t COMPREPLY < <(compgen -f -- "$cur")'
MORE_FILES = 'mapfile -t -O "${#COMPREPLY[@]}" COMPREPLY < <(compgen -f -- "$cur")'


def _offer(words: str) -> str:
    return f'mapfile -t COMPREPLY < <(compgen -W "{words}" -- "$cur")'


def _levels(level: Level, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Level]]:
    out = [(path, level)]
    for name, sub in level.subcommands.items():
        out += _levels(sub, (*path, name))
    return out


def script(program: str, level: Level) -> str:
    """The completion script: the words each (sub)command level offers, found by walking
    the command line's subcommand words."""
    function = "_" + program.replace("-", "_")
    lines = [
        f"# bash completion for {program}. Generated from its argparse parser by",
        "# tools/completion.py (make completion); do not edit by hand.",
        "",
        f"{function}() {{",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="" path="" i word',
        '    [ "$COMP_CWORD" -gt 0 ] && prev="${COMP_WORDS[COMP_CWORD-1]}"',
        "    # The subcommands typed so far, as one path (\"sign\", \"enroll\", ...).",
        '    for ((i = 1; i < COMP_CWORD; i++)); do',
        '        word="${COMP_WORDS[i]}"',
        '        case "$path:$word" in',
    ]
    for path, lvl in _levels(level):
        for name in lvl.subcommands:
            inner = " ".join((*path, name))
            lines.append(f'            "{" ".join(path)}:{name}") path="{inner}" ;;')
    lines += [
        "        esac",
        "    done",
        '    case "$path:$prev" in',
    ]
    for path, lvl in _levels(level):
        key = " ".join(path)
        for option, values in lvl.option_choices.items():
            lines.append(f'        "{key}:{option}") {_offer(_words(values))}; return ;;')
        for option in lvl.option_files:
            lines.append(f'        "{key}:{option}") {FILES}; return ;;')
        for option in lvl.option_values:
            lines.append(f'        "{key}:{option}") COMPREPLY=(); return ;;')
    lines += [
        "    esac",
        '    case "$path" in',
    ]
    for path, lvl in _levels(level):
        words = [*lvl.options, *lvl.subcommands, *lvl.choices]
        files = f'; [[ "$cur" == -* ]] || {MORE_FILES}' if lvl.files else ""
        lines.append(f'        "{" ".join(path)}") {_offer(_words(words))}{files} ;;')
    lines += [
        "    esac",
        "}",
        f"complete -F {function} {program}",
        "",
    ]
    return "\n".join(lines)


def generate(program: str) -> str:
    return script(program, describe(parser_of(program)))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: completion.py DIRECTORY", file=sys.stderr)
        return 2
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    for program in PROGRAMS:
        (out / program).write_text(generate(program))
    return 0


if __name__ == "__main__":
    sys.exit(main())
