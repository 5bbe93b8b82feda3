"""Which clsact qdiscs joinproxyd created, kept on disk so a restart after kill -9 knows.

The tc programs need a clsact qdisc on their link. The daemon adds one where there is none and
removes it again when its last filter is gone, but never one that was there before it (an
operator's, another tool's: their filters may come and go). Kept in memory only, that line is
lost with the process: after kill -9 the restarted daemon finds a clsact it cannot tell from a
foreign one, and leaves it forever. So the claim is written down *before* the qdisc is added:

    <runtime directory>/clsact.json     beside the control socket and ipip-knobs.json
    {"version": 1, "qdiscs": {"7": "join0", "3": "bb0"}}      ifindex -> ifname

A claim counts only while the link with that ifindex still has that name (a link that went
took its qdisc with it; a new link under an old index is another link). A claim whose ``add``
then finds a clsact already there (EEXIST) is withdrawn at once: not ours. The file is replaced
whole (temporary file, rename) and removed when no claim is left. A file that cannot be read
or parsed counts as empty (logged): the daemon then leaves qdiscs it cannot prove are its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from . import describe_errno

VERSION = 1
log = logging.getLogger(__name__)


def parse(text: str) -> dict[int, str]:
    """ifindex -> ifname; ValueError for anything this module did not write."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("version") != VERSION \
            or not isinstance(data.get("qdiscs"), dict):
        raise ValueError(f"not a version {VERSION} record")
    out = {}
    for index, name in data["qdiscs"].items():
        if not (isinstance(index, str) and index.isascii() and index.isdigit()
                and 0 < int(index) < 2**31):
            raise ValueError(f"{index!r} is not an ifindex")
        if not isinstance(name, str) or not 0 < len(name) <= 15 or "/" in name:
            raise ValueError(f"{name!r} is not an interface name")
        out[int(index)] = name
    return out


class QdiscRecord:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.claims: dict[int, str] = {}
        self.error: str | None = None  # the last failure to write, logged once

    def load(self) -> dict[int, str]:
        try:
            self.claims = parse(self.path.read_text())
        except FileNotFoundError:
            self.claims = {}
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            why = describe_errno(exc.errno or 0) if isinstance(exc, OSError) else str(exc)
            log.error("%s cannot be used (%s): clsact qdiscs an earlier run added are left",
                      self.path, why)
            self.claims = {}
        return dict(self.claims)

    def claim(self, ifindex: int, ifname: str) -> None:
        self.claims[ifindex] = ifname
        self._save()

    def withdraw(self, ifindex: int) -> None:
        if self.claims.pop(ifindex, None) is not None:
            self._save()

    def keep_only(self, current: dict[int, str]) -> None:
        """Drop claims whose link is gone or renamed (current: ifindex -> ifname now)."""
        stale = [i for i, name in self.claims.items() if current.get(i) != name]
        for ifindex in stale:
            del self.claims[ifindex]
        if stale:
            self._save()

    def _save(self) -> None:
        try:
            if not self.claims:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                return
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({"version": VERSION, "qdiscs": {
                str(i): name for i, name in sorted(self.claims.items())}}) + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            message = f"cannot write {self.path}: {describe_errno(exc.errno or 0)}"
            if message != self.error:
                log.error("%s; a clsact qdisc added now is removed by a clean stop, not "
                          "after a crash", message)
            self.error = message
            return
        self.error = None
