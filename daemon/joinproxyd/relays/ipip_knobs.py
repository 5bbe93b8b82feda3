"""The join links' sysctls as they were before the ipip mode changed them, kept on disk.

The ipip mode sets proxy_ndp, forwarding and proxy_delay on every join link it serves
(kernel/ndp.py) and puts the old values back when it stops serving the link. Kept in memory
only, a kill -9 would lose them: the restarted daemon would read the 1s the killed run wrote,
take them for the operator's, and never restore the originals. So the old values are also
written to a file before any knob is changed, and the next run starts from that file, the way
NAT66 keeps the forwarding value from before it in its nftables table.

    <runtime directory>/ipip-knobs.json     beside the control socket: /run/joinproxyd, a
                                            tmpfs, so it outlives a crash and not a reboot
                                            (which resets the knobs too)
    {"version": 1, "links": {"join0": {"ifindex": 7,
                                       "knobs": {"proxy_ndp": "0", "forwarding": "0",
                                                 "proxy_delay": "80"}}}}

Each link is recorded with its ifindex: a link that disappeared took its knobs with it, and a
link made since under the same name is another link whose values are its own, so neither is
written to. The file is replaced whole (a temporary file renamed over it, so a reader never
sees half of one) whenever a link is recorded or restored, and removed when none is left.

A file that cannot be read or makes no sense is logged, renamed aside (``.corrupt``) for the
operator to look at, and treated as empty: the daemon runs on, and the values it cannot know
stay as they are. A file that cannot be written is logged once; the knobs are still changed
and restored by a clean stop, only a crash loses them then.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..kernel import KernelError, describe_errno, ndp

VERSION = 1
_VALUE = re.compile(r"^-?[0-9]{1,10}$")  # what the kernel prints for these integer knobs


@dataclass(frozen=True)
class Saved:
    """One link's knobs from before the mode changed them."""

    ifindex: int
    knobs: dict[str, str]


def parse(text: str) -> dict[str, Saved]:
    """The record's links; ValueError (with the reason) for anything but a record this
    module wrote. Names and values end up in /proc/sys paths and writes: checked strictly."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise ValueError(f"not a version {VERSION} record")
    links = data.get("links")
    if not isinstance(links, dict):
        raise ValueError('"links" is not a table')
    out = {}
    for name, entry in links.items():
        if not isinstance(name, str) or not name or len(name) > 15 or "/" in name \
                or name in (".", ".."):
            raise ValueError(f"{name!r} is not an interface name")
        if not isinstance(entry, dict):
            raise ValueError(f"{name}: not a table")
        ifindex, knobs = entry.get("ifindex"), entry.get("knobs")
        if isinstance(ifindex, bool) or not isinstance(ifindex, int) or ifindex <= 0:
            raise ValueError(f"{name}: ifindex {ifindex!r} is not a positive integer")
        if not isinstance(knobs, dict) or not knobs:
            raise ValueError(f"{name}: no knobs")
        for knob, value in knobs.items():
            if knob not in ndp.PROXY_KNOBS:
                raise ValueError(f"{name}: {knob!r} is not a knob the ipip mode changes")
            if not isinstance(value, str) or not _VALUE.match(value):
                raise ValueError(f"{name}: {knob} = {value!r} is not an integer value")
        out[name] = Saved(ifindex, dict(knobs))
    return out


def dump(links: Mapping[str, Saved]) -> str:
    return json.dumps({"version": VERSION, "links": {
        name: {"ifindex": saved.ifindex, "knobs": saved.knobs}
        for name, saved in sorted(links.items())}}, indent=1) + "\n"


class KnobRecord:
    def __init__(self, path: Path, log: logging.Logger) -> None:
        self.path = path
        self.log = log
        self.error: str | None = None  # the last failure to write, for status

    def load(self) -> dict[str, Saved]:
        """What an earlier run recorded ({} when nothing was); never raises."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            why = describe_errno(exc.errno or 0) if isinstance(exc, OSError) else str(exc)
            return self._unusable(f"cannot be read: {why}")
        try:
            return parse(text)
        except ValueError as exc:
            return self._unusable(str(exc))

    def _unusable(self, why: str) -> dict[str, Saved]:
        aside = self.path.with_name(self.path.name + ".corrupt")
        try:
            os.replace(self.path, aside)
            kept = f"; kept as {aside}"
        except OSError as exc:
            kept = f"; cannot move it aside ({describe_errno(exc.errno or 0)}), it is " \
                   "overwritten at the next change"
        self.log.error("ipip: the record of the join links' sysctls from before an earlier "
                       "run, %s, %s: those values cannot be restored, the links' current "
                       "ones are taken as the operator's%s", self.path, why, kept,
                       extra={"MODE": "ipip"})
        return {}

    def save(self, links: Mapping[str, Saved]) -> bool:
        """Replace the file with these links (remove it when there are none). A failure is
        logged once and returned as False; the caller goes on (see the module docstring)."""
        try:
            if links:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                temp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
                # No fsync: the file has to outlive the process, not the machine (tmpfs).
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as out:
                    out.write(dump(links))
                os.replace(temp, self.path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        except OSError as exc:
            message = f"cannot write {self.path}: {describe_errno(exc.errno or 0)}"
            if message != self.error:
                self.log.error("ipip: %s; the join links' sysctls are restored by a clean "
                               "stop, but not after a crash", message, extra={"MODE": "ipip"})
            self.error = message
            return False
        self.error = None
        return True


def still_there(name: str, saved: Saved) -> bool:
    """Whether the recorded link exists (the same link: same name, same ifindex)."""
    return ndp.link_index(name) == saved.ifindex


def restore(name: str, saved: Saved) -> bool:
    """Write the recorded values back; False if the link is gone (nothing to restore).
    Blocking (a few /proc/sys writes): call it through asyncio.to_thread."""
    if not still_there(name, saved):
        return False
    try:
        ndp.write_knobs(name, saved.knobs)
    except KernelError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV):  # gone just now
            return False
        raise
    return True


async def restore_leftovers(path: Path, log: logging.Logger) -> None:
    """ipip is not configured now: give back the knobs a killed ipip run changed. A link
    that cannot be restored stays in the record for the next start to try again."""
    record = KnobRecord(path, log)
    links = record.load()
    if not links:
        return
    left: dict[str, Saved] = {}
    for name, saved in links.items():
        try:
            done = await asyncio.to_thread(restore, name, saved)
        except KernelError as exc:
            log.error("ipip: cannot restore %s's sysctls an earlier ipip run changed: %s",
                      name, exc, extra={"INTERFACE": name, "MODE": "ipip"})
            left[name] = saved
            continue
        log.info("ipip: %s", describe(name, saved, done) + " (ipip is not configured now)",
                 extra={"INTERFACE": name, "MODE": "ipip"})
    record.save(left)


def describe(name: str, saved: Saved, restored: bool) -> str:
    values = ", ".join(f"{k}={v}" for k, v in sorted(saved.knobs.items()))
    if restored:
        return f"{name}: sysctls from before an earlier run restored ({values})"
    return f"{name}: gone since an earlier run recorded its sysctls; nothing to restore"


def as_status(links: Mapping[str, Saved]) -> dict[str, Any]:
    return {name: dict(saved.knobs) for name, saved in sorted(links.items())}
