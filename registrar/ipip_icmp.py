"""Keep the registrar's kernel from refusing the tunnel packets its user-space end accepts.

A raw socket gets a copy of each IPv6-in-IPv6 packet; the kernel still hands the packet to
its own protocol-41 handler. Where that handler is loaded (``tunnel6``: ip6_tunnel, sit,
xfrm6_tunnel; Debian's stock kernels load it on demand) and no kernel tunnel matches, it
answers every packet with an ICMPv6 port unreachable. A proxy with a kernel ip6ip6 tunnel
turns that into "address unreachable" for its pledge, whose TCP connect then fails at once
with EHOSTUNREACH whenever the error wins the race against our SYN-ACK (seen in Debian 12's
6.1 under QEMU: 6 connects in 8; the rate limiter of one error per second is what lets the
others through).

An nftables table of ours on the output hook drops exactly those errors: destination
unreachable, port unreachable, quoting a packet whose next header is one of the protocols we
terminate (and, with ``[ipip] address``, sent from that address). Through libnftables' JSON
API (Debian's python3-nftables), in one atomic batch. Without the binding or the rights the
registrar still runs and says once what the pledges will see.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from ipaddress import IPv6Address
from typing import Any

log = logging.getLogger(__name__)

TABLE = "brski_registrar_ipip"
# the quoted packet's next-header byte: ICMPv6 header (8 bytes) + offset 6 in the IPv6 header
QUOTED_NEXT_HEADER_BITS = (8 + 6) * 8
ICMPV6, DESTINATION_UNREACHABLE, PORT_UNREACHABLE = 58, 1, 4


def table_commands(protocols: Iterable[int], address: IPv6Address | None) -> list[dict[str, Any]]:
    """The batch that (re)creates our table: add (so delete cannot fail), delete, add."""
    table = {"family": "ip6", "name": TABLE}
    chain = {"family": "ip6", "table": TABLE, "name": "output", "type": "filter",
             "hook": "output", "prio": 0, "policy": "accept"}
    match: list[dict[str, Any]] = []
    if address is not None:
        match.append({"match": {"op": "==", "right": str(address),
                                "left": {"payload": {"protocol": "ip6", "field": "saddr"}}}})
    match += [
        # numbers, not names: nft resolves protocol names through /etc/protocols, which a
        # minimal system may lack (Debian without netbase)
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": ICMPV6}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "icmpv6", "field": "type"}},
                   "right": DESTINATION_UNREACHABLE}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "icmpv6", "field": "code"}},
                   "right": PORT_UNREACHABLE}},
        {"match": {"op": "==", "right": {"set": sorted(set(protocols))},
                   "left": {"payload": {"base": "th", "offset": QUOTED_NEXT_HEADER_BITS,
                                        "len": 8}}}},
        {"counter": None}, {"drop": None}]
    return [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}},
            {"add": {"chain": chain}},
            {"add": {"rule": {"family": "ip6", "table": TABLE, "chain": "output",
                              "expr": match}}}]


def _nft() -> Any:
    import nftables  # Debian's python3-nftables (libnftables)

    nft = nftables.Nftables()
    nft.set_json_output(True)
    return nft


def _run(nft: Any, commands: list[dict[str, Any]]) -> str | None:
    """None on success, else libnftables' error (one line)."""
    rc, _out, err = nft.json_cmd({"nftables": commands})
    return None if rc == 0 else (err.strip().splitlines() or [f"exit {rc}"])[-1]


class KernelIcmpFilter:
    """Our table while the IPIP service runs; ``state`` says what holds for status."""

    def __init__(self, protocols: Iterable[int], address: IPv6Address | None) -> None:
        self.protocols = tuple(protocols)
        self.address = address
        self.state = "not installed"
        self._nft: Any = None  # one libnftables context, for install, counters and removal

    def install(self) -> None:
        try:
            self._nft = _nft()
            problem = _run(self._nft, table_commands(self.protocols, self.address))
        except ImportError:
            problem = "no python3-nftables"
        except Exception as exc:  # libnftables missing or broken: the relay still runs
            problem = str(exc) or type(exc).__name__
        if problem is None:
            self.state = "installed"
            return
        self.state = f"not installed: {problem}"
        log.warning("ipip: cannot keep the kernel from answering proxies' protocol %s packets "
                    "with ICMPv6 port unreachable (nftables table %s: %s); where the kernel "
                    "has an ip6 tunnel handler, pledges behind kernel-tunnel proxies may see "
                    "'no route to host'", "/".join(map(str, self.protocols)), TABLE, problem)

    def dropped(self) -> int | None:
        """Errors dropped so far (the rule's counter), None when not installed."""
        if self.state != "installed":
            return None
        try:
            rc, out, _err = self._nft.json_cmd(
                {"nftables": [{"list": {"table": {"family": "ip6", "name": TABLE}}}]})
        except Exception:
            return None
        if rc != 0:
            return None
        if isinstance(out, str):
            out = json.loads(out or "{}")
        for item in out.get("nftables", []):
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    return int(expr["counter"].get("packets", 0))
        return None

    def remove(self) -> None:
        if self.state != "installed":
            return
        try:
            _run(self._nft, [{"delete": {"table": {"family": "ip6", "name": TABLE}}}])
        except Exception as exc:
            log.debug("ipip: removing nftables table %s: %s", TABLE, exc)
        self.state = "removed"
