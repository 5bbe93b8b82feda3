"""``brski-registrar store ...`` and ``brski-masa store ...``: export a store to a file and
import it into another, on either engine (SQLite -> PostgreSQL is the way a single registrar
becomes a cluster; PostgreSQL -> SQLite the way back).

    brski-registrar store export (--config FILE | --store PATH|URL) OUT      (- : stdout)
    brski-registrar store import (--config FILE | --store PATH|URL) IN       (- : stdin)
    brski-registrar store check  (--config FILE | --store PATH|URL)

Opening a store migrates it to the current schema first, so an export is always of the current
schema version, whatever the store's was. An import goes into an empty store of the same role
(a new SQLite file, or an empty PostgreSQL database) in one transaction, keeping every row and
its id. ``check`` opens (and so migrates) the store and prints its engine, schema version and
row counts. Exit codes: 0 done, 1 store or file error, 2 usage, 78 bad configuration.

The file is JSON lines: a header ``{"format": FORMAT, "role": ..., "schema_version": ...}``,
then one ``{"table": ..., "row": {column: value}}`` per row, bytes as ``{"b64": ...}``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .store import SCHEMA_VERSION, TABLES, Store, StoreError, display_name
from .tomlconfig import ConfigError

FORMAT = "joinproxyd-store-export"


def _encode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"b64": base64.b64encode(bytes(value)).decode()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise ValueError(f"unexpected object value {value!r}")
        return base64.b64decode(value["b64"], validate=True)
    if value is not None and not isinstance(value, str | int | float):
        raise ValueError(f"unexpected value {value!r}")
    return value


def export_lines(store: Store) -> Iterator[str]:
    yield json.dumps({"format": FORMAT, "role": store.role, "schema_version": SCHEMA_VERSION})
    for table in TABLES:
        columns, rows = store.table_rows(table)
        for row in rows:
            yield json.dumps({"table": table,
                              "row": {c: _encode(v) for c, v in zip(columns, row, strict=True)}},
                             sort_keys=True)


def import_lines(store: Store, lines: IO[str]) -> dict[str, int]:
    """Rows per table imported; ``StoreError`` (with the line number) for a bad file."""
    header_line = lines.readline()
    try:
        header = json.loads(header_line)
    except ValueError as exc:
        raise StoreError(f"line 1: not an export header ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise StoreError(f"line 1: not a {FORMAT} file")
    if header.get("role") != store.role:
        raise StoreError(f"the export is of a {header.get('role')} store, not a {store.role}")
    if header.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"the export is of schema version {header.get('schema_version')}; "
                         f"this program imports version {SCHEMA_VERSION} (export it again "
                         "with this version, which migrates the store first)")
    if not store.is_empty():
        raise StoreError(f"{display_name(store.target)} is not empty: import only into a new "
                         "store")
    tables: dict[str, tuple[list[str], list[tuple[Any, ...]]]] = {}
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            table, row = item["table"], item["row"]
            if table not in TABLES or not isinstance(row, dict):
                raise ValueError(f"unknown table {table!r}")
            columns = sorted(row)
            known = tables.setdefault(table, (columns, []))
            if known[0] != columns:
                raise ValueError("columns differ from the table's first row")
            known[1].append(tuple(_decode(row[c]) for c in columns))
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"line {number}: {exc}") from exc
    try:
        store.load_rows(tables)
    except store.errors as exc:
        raise StoreError(f"import refused by the store, nothing imported: {exc}") from exc
    return {table: len(rows) for table, (_, rows) in tables.items()}


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="export, import or check the store")
    sub = p.add_subparsers(dest="command", required=True)
    for name, what in (("export", "OUT"), ("import", "IN"), ("check", None)):
        cmd = sub.add_parser(name)
        where = cmd.add_mutually_exclusive_group(required=True)
        where.add_argument("--config", help="the service's configuration ([store])")
        where.add_argument("--store", help="an SQLite file or a postgresql:// URL")
        if what:
            cmd.add_argument("file", metavar=what, help="the export file (- for std%s)"
                             % ("out" if name == "export" else "in"))
    return p


def main(argv: list[str], role: str,
         load_config: Callable[[str], Any]) -> int:
    prog = f"brski-{role} store"
    args = parser(prog).parse_args(argv)
    try:
        target = args.store if args.store else load_config(Path(args.config)).store_path
    except ConfigError as exc:
        print(f"{prog}: {args.config}: {exc}", file=sys.stderr)
        return os.EX_CONFIG
    try:
        with Store(target, role) as store:
            if args.command == "export":
                with _stream(args.file, "w") as out:
                    for line in export_lines(store):
                        out.write(line + "\n")
            elif args.command == "import":
                with _stream(args.file, "r") as src:
                    counts = import_lines(store, src)
                print(f"imported {sum(counts.values())} rows into "
                      f"{display_name(target)}: " + ", ".join(
                          f"{t} {n}" for t, n in counts.items()))
            else:
                counts = {t: len(store.table_rows(t)[1]) for t in TABLES}
                print(f"{display_name(target)}: {store.engine_name} {role} store, schema "
                      f"version {SCHEMA_VERSION}; " + ", ".join(
                          f"{t} {n}" for t, n in counts.items()))
    except StoreError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{prog}: {exc.filename or args.file}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


def _stream(name: str, mode: str) -> contextlib.AbstractContextManager[IO[str]]:
    """The named file, or stdin/stdout for "-" (left open)."""
    if name == "-":
        return contextlib.nullcontext(sys.stdout if mode == "w" else sys.stdin)
    return open(name, mode)
