"""CoRE discovery of the join port on join links, for constrained pledges (plain CoAP, UDP 5683).

A pledge asks ``GET coap://[ff02::fd]/.well-known/core?brski-jp=*`` (join-proxy draft §5.5,
cBRSKI §10) and relays its DTLS to the port in the answer, on the address the answer came
from::

    <>;brski-jp=8485

Deployed pledges built on older drafts ask ``?rt=brski.jp`` and get the legacy form, which
names the join link's link-local address::

    <coaps://[fe80::1]:8485>;rt=brski.jp

The control plane decides what is announced (:meth:`JoinPortAnnouncer.set_targets`): the join
links a constrained relay mode serves, and only while joining is open; with no targets the
server is stopped, so nobody on a join link hears of a proxy that cannot relay. Answers are per
arrival interface (IPV6_PKTINFO); a request from another interface, or a multicast one that
matches nothing, gets no answer (RFC 7252 §8.2, RFC 7967); a matching multicast one is answered
after a random delay within a short Leisure (§8.2).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import aiocoap
from aiocoap import resource
from aiocoap.numbers.contentformat import ContentFormat

from brski import linkformat

from ..model import JoinInterface

COAP_PORT = 5683
ALL_COAP_NODES_LINK = "ff02::fd"  # RFC 7252 §12.8: pledges ask on their link only
_PKTINFO = struct.Struct("16sI")  # struct in6_pktinfo (RFC 3542)
_SUPPRESS_ALL = 2 | 8 | 16  # RFC 7967 No-Response: no 2.xx, 4.xx, 5.xx
DEFAULT_LEISURE = 0.5


@dataclass(frozen=True, order=True)
class JoinPortTarget:
    """One join link's answer: the join port on its link-local address."""

    name: str
    index: int
    link_local: str
    port: int

    @classmethod
    def of(cls, iface: JoinInterface) -> JoinPortTarget:
        return cls(iface.name, iface.index, iface.link_local.split("%")[0], iface.port)

    def links(self) -> list[linkformat.DiscoveryLink]:
        return [linkformat.JoinPortLink(self.port),
                linkformat.JoinPortLink(self.port, ipaddress.IPv6Address(self.link_local))]


def constrained_targets(served: Iterable[JoinInterface], joining: bool,
                        is_constrained: Callable[[str], bool]) -> list[JoinPortTarget]:
    """What the control plane announces: join links with a constrained mode, while joining."""
    if not joining:
        return []
    return sorted(JoinPortTarget.of(i) for i in served
                  if any(is_constrained(mode) for mode in i.modes))


def _ifindex(request: aiocoap.Message) -> int:
    pktinfo = getattr(request.remote, "pktinfo", None)
    if not pktinfo or len(pktinfo) < _PKTINFO.size:
        return 0
    return int(_PKTINFO.unpack_from(pktinfo)[1])


class _WellKnownCore(resource.Resource):
    def __init__(self, leisure: float) -> None:
        super().__init__()
        self.by_index: dict[int, JoinPortTarget] = {}
        self.leisure = leisure
        self.answered = 0

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        multicast = bool(getattr(request.remote, "is_multicast_locally", False))
        target = self.by_index.get(_ifindex(request))
        if request.opt.accept not in (None, ContentFormat.LINKFORMAT):
            response = aiocoap.Message(code=aiocoap.NOT_ACCEPTABLE)
        else:
            found = linkformat.filter_links(target.links() if target else [],
                                            request.opt.uri_query)
            response = aiocoap.Message(code=aiocoap.CONTENT,
                                       payload=linkformat.format_links(found).encode(),
                                       content_format=ContentFormat.LINKFORMAT)
            if found:
                if multicast and self.leisure > 0:
                    await asyncio.sleep(random.uniform(0, self.leisure))
                self.answered += 1
            elif multicast:
                response.opt.no_response = _SUPPRESS_ALL
        if multicast and not response.code.is_successful():
            response.opt.no_response = _SUPPRESS_ALL
        return response


class _Unparsable(logging.Filter):
    """Counts aiocoap's "Ignoring unparsable message" records and lets only the first one
    through: garbage from a join link must not become a flood of log lines."""

    def __init__(self, refused: Callable[[], None]) -> None:
        super().__init__()
        self.count = 0
        self.refused = refused

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Ignoring unparsable message"):
            return True
        self.count += 1
        self.refused()
        if self.count == 1:
            record.msg = "CoRE join-port discovery: " + str(record.msg) + \
                " (further ones are counted only)"
        return self.count == 1


class JoinPortAnnouncer:
    """Answers join-port discovery on the join links the control plane names."""

    def __init__(self, log: logging.Logger, *, port: int = COAP_PORT,
                 leisure: float = DEFAULT_LEISURE,
                 refused: Callable[[], None] = lambda: None) -> None:
        """``refused()`` counts a datagram that is not CoAP (the daemon's drop metric)."""
        self.log = log
        self.port = port
        self.wkc = _WellKnownCore(leisure)
        self.targets: tuple[JoinPortTarget, ...] = ()
        self.error: str | None = None  # why the server is not running though wanted
        self._context: aiocoap.Context | None = None
        self._groups: tuple[str, ...] = ()
        self._logger = logging.getLogger(f"{log.name}.coap-join")
        self.unparsable = _Unparsable(refused)
        self._logger.addFilter(self.unparsable)

    @property
    def serving(self) -> bool:
        return self._context is not None

    async def set_targets(self, targets: Sequence[JoinPortTarget]) -> None:
        """Answer for exactly these join links (none: stop answering, close the socket)."""
        wanted = tuple(sorted(targets))
        groups = tuple(sorted({t.name for t in wanted}))
        if wanted == self.targets and (self._context is not None or not wanted):
            return
        self.wkc.by_index = {t.index: t for t in wanted}
        if groups != self._groups or self._context is None:
            # aiocoap joins its multicast groups when the context is made: a new set of links
            # means a new context.
            await self._close()
            if groups:
                await self._open(groups)
        if wanted != self.targets:
            if wanted:
                self.log.info("CoRE join-port discovery: answering on %s",
                              ", ".join(f"{t.name} (port {t.port})" for t in wanted))
            elif self.targets:
                self.log.info("CoRE join-port discovery: no longer answering")
        self.targets = wanted

    async def _open(self, groups: tuple[str, ...]) -> None:
        site = resource.Site()
        site.add_resource([".well-known", "core"], self.wkc)
        try:
            self._context = await aiocoap.Context.create_server_context(
                site, bind=("::", self.port), loggername=self._logger.name,
                multicast=[(ALL_COAP_NODES_LINK, name) for name in groups],
                transports=["udp6"])
        except OSError as exc:
            error = f"cannot bind UDP {self.port}: {exc.strerror or exc}"
            if error != self.error:  # once per cause, not on every reconcile retry
                self.log.warning("CoRE join-port discovery: %s; pledges will not find the "
                                 "proxy by CoAP", error)
            self.error = error
            self._context = None
            return
        self.error = None
        self._groups = groups

    async def _close(self) -> None:
        if self._context is not None:
            await self._context.shutdown()
        self._context = None
        self._groups = ()

    async def stop(self) -> None:
        await self._close()
        self.targets = ()
        self.wkc.by_index = {}

    def status(self) -> dict[str, object]:
        return {"serving": self.serving, "error": self.error, "answered": self.wkc.answered,
                "unparsable": self.unparsable.count,
                "links": [{"interface": t.name, "port": t.port} for t in self.targets]}
