"""The one nftables table a caller owns, programmed through libnftables' JSON API.

Why libnftables JSON (Debian's python3-nftables): it is nft's own parser and evaluator, so the
JSON we send means exactly what `nft -j list table` prints back, and errors come with nft's
own wording. pyroute2's nftables support builds raw expressions by hand (platform fact 8).

apply(spec) replaces the whole table in ONE batch, which libnftables sends as one netlink
transaction and the kernel commits atomically:

    add table      (so that the delete below cannot fail on a missing table)
    delete table   (chains, rules, counters, sets: everything the old version had)
    add table
    add chain / counter / set / rule ...   (the new contents, in the spec's order)

Packets meet either the old table or the new one, never an empty or half-built one, and a
failed batch changes nothing. Deleting rather than flushing also drops chains and counters the
new spec no longer has and lets a base chain change hook or priority. The price: counters in
the table start again from zero; callers that export them read them first (see counters()).

A spec is a list of one-key JSON objects without family and table, which apply() fills in:
``[{"chain": {"name": "forward", ...}}, {"rule": {"chain": "forward", "expr": [...]}}]``.
An object naming another family or table is refused, so the owner cannot touch other tables.

Calls block for as long as libnftables talks to the kernel (milliseconds); one Table must not
be used from two threads at once.
"""

from __future__ import annotations  # a method is named list: keep annotations lazy

import errno
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import KernelError, features

TableSpec = list[dict[str, Any]]

# Object kinds a table may hold (the JSON names of nft's commands' objects).
OBJECT_KINDS = frozenset({"chain", "rule", "counter", "quota", "limit", "set", "map",
                          "element", "flowtable", "ct helper", "ct timeout", "ct expectation",
                          "secmark", "synproxy"})

# strerror text -> errno: libnftables reports kernel errors only as text ("Could not process
# rule: No such file or directory"); mapping it back lets callers decide by errno.
_STRERROR = {os.strerror(code): code for code in sorted(errno.errorcode, reverse=True)}
_INDEX = re.compile(r"command array at index (\d+)")


# nft family names -> NFPROTO_* numbers, for the netlink probe below
_NFPROTO = {"inet": 1, "ip": 2, "arp": 3, "netdev": 5, "bridge": 7, "ip6": 10}


def table_present(family: str, name: str) -> bool:
    """Is there such a table? Asked over plain netlink (pyroute2), so that a daemon that does
    not program nftables (no nat66) neither imports the binding nor loads libnftables just
    to look for a table a killed run may have left. Blocks for a netlink round trip."""
    from pyroute2.nftables.main import NFTables

    nft = NFTables(nfgen_family=_NFPROTO[family])
    try:
        return any(msg.get_attr("NFTA_TABLE_NAME") == name
                   and msg["nfgen_family"] == _NFPROTO[family] for msg in nft.get_tables())
    except Exception as exc:
        raise KernelError(f"listing nftables tables: {exc}",
                          getattr(exc, "code", None)) from None
    finally:
        nft.close()


def _hook(chain: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes a chain the same base chain: kept only if none of it changes."""
    return tuple(chain.get(key) for key in ("type", "hook", "prio", "policy"))


class NftablesError(KernelError):
    """libnftables refused a command; str() is its message, errno is set when it has one."""


@dataclass(frozen=True)
class CounterValue:
    packets: int
    bytes: int


def _errno_in(message: str) -> int | None:
    for text, code in _STRERROR.items():
        if message.endswith(text):
            return code
    return None


def _describe(command: Mapping[str, Any]) -> str:
    """'add rule ip6 joinproxyd forward' for error messages."""
    verb, body = next(iter(command.items()))
    kind, obj = next(iter(body.items()))
    where = [obj.get("family", ""), obj.get("table", obj.get("name", ""))]
    if kind != "table":
        where.append(obj.get("chain", obj.get("name", "")))
    return " ".join([verb, kind, *[str(w) for w in where if w]])


class Table:
    """Owner of one nftables table: family (ip6, inet, ...) and name."""

    def __init__(self, family: str, name: str, *, nft: Any = None) -> None:
        """``nft`` replaces the libnftables context (tests pass a fake)."""
        if nft is None:
            nft = self._context()
        self._nft = nft
        # One libnftables context is not safe to share between threads, and this table is
        # read from the metrics thread while the event loop's worker threads write it.
        self._lock = threading.Lock()
        self.family = family
        self.name = name
        self._id = {"family": family, "name": name}

    @staticmethod
    def _context() -> Any:
        # Imported here, not with the module: only a configured nat66 needs the binding,
        # which OpenWrt has no package for (Debian's python3-nftables; the venv sees it
        # through --system-site-packages).
        binding: Any = features.nftables_binding()
        if binding is None:
            raise KernelError("cannot program nftables: "
                              f"{features.install_hint('nftables-binding')}", errno.ENOENT)
        try:
            return binding.Nftables()
        except OSError as exc:
            raise KernelError(f"cannot load libnftables ({exc}); "
                              f"{features.install_hint('libnftables')}", exc.errno) from None

    def __repr__(self) -> str:
        return f"Table({self.family} {self.name})"

    # -- commands ------------------------------------------------------------------------------
    def apply(self, spec: Sequence[Mapping[str, Any]]) -> None:
        """Replace the table's contents with exactly these objects, in one transaction.

        Base chains that stay are flushed and refilled, not deleted and added again: the
        kernel hooks a new base chain in before the transaction commits, so a packet meeting
        the new, still empty chain before the commit and the old one after it passed both
        (measured: about one packet in 300 replacements). Every other object is deleted and
        added again, so named counters restart at zero as they would in a new table.
        """
        wanted = [self._qualify(obj) for obj in spec]
        keep = {(obj["chain"]["name"], _hook(obj["chain"])) for obj in wanted if "chain" in obj}
        commands: list[dict[str, Any]] = [
            {"add": {"table": dict(self._id)}},
            {"flush": {"table": dict(self._id)}},  # every rule, in this same transaction
        ]
        for obj in self.list():
            kind, body = next(iter(obj.items()))
            if kind == "rule" or kind not in OBJECT_KINDS or not isinstance(body, Mapping):
                continue
            if kind == "chain" and (body.get("name"), _hook(body)) in keep:
                continue  # a base chain that stays keeps its hook
            commands.append({"delete": {kind: {"family": self.family, "table": self.name,
                                               "name": body["name"]}}})
        commands += [{"add": obj} for obj in wanted]
        self._run(commands)

    def delete(self) -> None:
        """Remove the table and everything in it; no error if it is not there."""
        self._run([{"add": {"table": dict(self._id)}}, {"delete": {"table": dict(self._id)}}])

    def exists(self) -> bool:
        output = self._run([{"list": {"tables": {"family": self.family}}}])
        return any(obj.get("table", {}).get("name") == self.name for obj in output)

    def list(self) -> list[dict[str, Any]]:
        """The table's objects as the kernel has them (with handles and counter values);
        [] when the table does not exist."""
        if not self.exists():
            return []
        return self._run([{"list": {"table": dict(self._id)}}])

    def counters(self) -> dict[str, CounterValue]:
        """Named counters of the table; {} when the table does not exist."""
        values: dict[str, CounterValue] = {}
        for obj in self.list():
            counter = obj.get("counter")
            if isinstance(counter, dict) and "name" in counter:
                values[counter["name"]] = CounterValue(int(counter.get("packets", 0)),
                                                       int(counter.get("bytes", 0)))
        return values

    # -- plumbing -----------------------------------------------------------------------------
    def _qualify(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        if len(obj) != 1:
            raise ValueError(f"a table object has exactly one kind: {obj!r}")
        kind, body = next(iter(obj.items()))
        if kind not in OBJECT_KINDS or not isinstance(body, Mapping):
            raise ValueError(f"not an object a table can hold: {kind!r}")
        for key, mine in (("family", self.family), ("table", self.name)):
            if body.get(key, mine) != mine:
                raise ValueError(f"{kind} names {key} {body[key]!r}; this owner only writes "
                                 f"{self.family} {self.name}")
        return {kind: {"family": self.family, "table": self.name, **body}}

    def _run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with self._lock:
            rc, output, error = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise self._error(commands, error)
        if not output:
            return []
        return [obj for obj in output.get("nftables", []) if "metainfo" not in obj]

    def _error(self, commands: list[dict[str, Any]], error: str) -> NftablesError:
        # libnftables' stderr holds "Error: ..." lines, echoes of the input and carets; keep
        # the messages, and name the command it points at, if any.
        messages = [line.split("Error: ", 1)[1].strip() for line in error.splitlines()
                    if "Error: " in line]
        message = "; ".join(messages) or error.strip() or "failed without a message"
        found = _INDEX.search(message)
        if found and int(found.group(1)) < len(commands):
            message += f" ({_describe(commands[int(found.group(1))])})"
        code = next((c for c in map(_errno_in, messages) if c is not None), None)
        return NftablesError(f"nftables: {message}", code)
