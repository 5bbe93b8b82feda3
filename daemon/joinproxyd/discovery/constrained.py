"""Constrained registrars: where the coaps and jpy relay modes send pledges' DTLS.

A registrar takes constrained pledges on UDP: at its CoAPS port (stateful relay, ``rt=brski``,
GRASP objective value ``BRSKI_JP``) and, if it offers one, at its JPY port (stateless relay,
``rt=brski.rjp``, ``BRSKI_RJP``). The proxy learns those endpoints from the configuration
(``coaps_port``/``jpy_port`` on ``[[registrars.static]]``), GRASP floods' UDP locators, CoRE
discovery on the backbone (``GET coap://[ff05::fd]/.well-known/core?rt=brski.rjp`` and
``?rt=brski``, :class:`CoreRegistrarFinder`) and mDNS ``_brski-registrar._udp``.

A registrar's 6TiSCH JRC (the cojp relay mode, RFC 9031) is a third kind of UDP endpoint here:
``cojp_port`` in the configuration, or a GRASP UDP locator under the objective value
``"6TiSCH-JRC"`` (brski.grasp.REGISTRAR_VALUE_COJP, a local value: nothing registers one). No
DNS-SD service or CoRE resource type names a JRC, so mDNS and CoRE discovery do not find one.
A JRC is probed with a CoAP ping (an empty CON, answered with a Reset, RFC 7252 §4.3): it
costs the JRC no OSCORE work and no state. It takes no part in the coaps/jpy choice.

Each endpoint is probed every health interval with one DTLS ClientHello: a live registrar
answers with a HelloVerifyRequest and keeps no state (RFC 6347 §4.2.1), so the probe is cheap
for both sides and proves the DTLS service itself, not only the host, is there.

The choice (join-proxy draft §4.1): a registrar that offers the stateless mode is used
stateless, since then the proxy keeps no per-pledge state; the operator can force one mode
(``[registrars] constrained_mode``). The modes are handed a :class:`RegistrarEndpoint` for the
chosen registrar, with ``coaps_port``/``jpy_port`` set for its healthy endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import aiocoap

from brski import coap_datagram, dtls, jpy, linkformat
from brski import grasp as wire
from brski.errors import DecodeError, ValidationError

from ..aio import cancel_and_wait, woken_or_timeout
from ..model import DropReason, RegistrarEndpoint
from .grasp import usable_address
from .mdns import CONSTRAINED_REGISTRAR_SERVICE, METHOD, MdnsRegistrarBrowser
from .registry import DISCOVERED_PREFERENCE

STATIC: Final = "static"
CORE: Final = "coap"
CORE_GROUPS: Final = ("ff05::fd", "ff02::fd")  # site-local first (join-proxy draft §5.4)
CORE_QUERIES: Final = (f"rt={linkformat.RT_REGISTRAR_JPY}", f"rt={linkformat.RT_REGISTRAR}")
MODE_CHOICES: Final = ("auto", "coaps", "jpy")
COAP_PORT: Final = 5683


class UdpKind(StrEnum):
    COAPS = "coaps"  # stateful relay to the registrar's CoAPS (DTLS) port
    JPY = "jpy"  # stateless relay to its JPY port
    COJP = "cojp"  # the cojp relay to its JRC's CoAP port (RFC 9031)


_FLOOD_VALUES: Final = {wire.REGISTRAR_VALUE_DTLS: UdpKind.COAPS,
                        wire.REGISTRAR_VALUE_JPY: UdpKind.JPY,
                        wire.REGISTRAR_VALUE_COJP: UdpKind.COJP}
_PORT_FIELDS: Final = {UdpKind.COAPS: "coaps_port", UdpKind.JPY: "jpy_port",
                       UdpKind.COJP: "cojp_port"}
_LINK_KINDS: Final = {linkformat.RegistrarKind.STATEFUL: UdpKind.COAPS,
                      linkformat.RegistrarKind.STATELESS: UdpKind.JPY}


@dataclass(frozen=True, order=True)
class UdpRegistrar:
    """One UDP endpoint of a registrar (address normalised, scope only for link-local)."""

    kind: UdpKind
    address: str
    port: int
    scope_id: int = 0

    @classmethod
    def make(cls, kind: UdpKind, address: str, port: int, scope_id: int = 0) -> UdpRegistrar:
        ip = ipaddress.IPv6Address(address.split("%")[0])
        return cls(UdpKind(kind), ip.compressed, port, scope_id if ip.is_link_local else 0)

    @property
    def key(self) -> str:
        return f"{self.kind}://[{self.address}]:{self.port}"

    @property
    def sockaddr(self) -> tuple[str, int, int, int]:
        return (self.address, self.port, 0, self.scope_id)


def static_udp_registrars(endpoints: Sequence[RegistrarEndpoint]) -> list[UdpRegistrar]:
    out = []
    for e in endpoints:
        for kind, port in ((UdpKind.COAPS, e.coaps_port), (UdpKind.JPY, e.jpy_port),
                           (UdpKind.COJP, e.cojp_port)):
            if port is not None:
                out.append(UdpRegistrar.make(kind, e.address, port, e.scope_id))
    return out


def udp_registrars_in_flood(flood: wire.Flood, ifindex: int) -> list[UdpRegistrar]:
    """The constrained endpoints of a registrar's flood: UDP locators whose objective value
    names the service (BRSKI_JP: CoAPS, BRSKI_RJP: JPY, 6TiSCH-JRC: a JRC); other UDP
    locators are not ours."""
    found: list[UdpRegistrar] = []
    for value, locator in flood.valued_locators_for(wire.AN_JOIN_REGISTRAR):
        kind = _FLOOD_VALUES.get(value) if isinstance(value, str) else None
        if kind is None or locator.protocol != wire.IPPROTO_UDP or not locator.port:
            continue
        if not usable_address(locator.address):
            continue
        scope = ifindex if locator.address.is_link_local else 0
        registrar = UdpRegistrar.make(kind, locator.address.compressed, locator.port, scope)
        if registrar not in found:
            found.append(registrar)
    return found


def udp_registrars_in_links(payload: bytes, ifindex: int) -> list[UdpRegistrar]:
    """The registrars a CoRE discovery answer names; raises DecodeError on a bad document.
    Links naming a host (not an address) or a zone are skipped: the proxy resolves nothing."""
    found: list[UdpRegistrar] = []
    for link in _registrar_links(payload):
        address = link.address
        if address.version != 6 or not usable_address(address):  # type: ignore[arg-type]
            continue
        scope = ifindex if address.is_link_local else 0
        registrar = UdpRegistrar.make(_LINK_KINDS[link.kind], address.compressed, link.port,
                                      scope)
        if registrar not in found:
            found.append(registrar)
    return found


def _registrar_links(payload: bytes) -> list[linkformat.RegistrarLink]:
    try:
        return linkformat.parse_registrars(payload)
    except ValidationError:
        # Well-formed but naming a host: keep the links that do name addresses.
        out = []
        for part in payload.split(b","):
            with contextlib.suppress(ValidationError, DecodeError):
                out.extend(linkformat.parse_registrars(part))
        return out


async def udp_probe(registrar: UdpRegistrar, timeout: float) -> str | None:
    """The health probe for the endpoint's kind: a CoAP ping for a JRC, else DTLS."""
    if registrar.kind is UdpKind.COJP:
        return await coap_ping(registrar, timeout)
    return await dtls_probe(registrar, timeout)


async def coap_ping(registrar: UdpRegistrar, timeout: float) -> str | None:
    """Send one CoAP ping (an empty CON); None if the Reset with its message ID came back,
    else why not. Any CoAP server answers it (RFC 7252 §4.3), so this proves the JRC's CoAP
    endpoint, not only the host, is there, and costs the JRC no OSCORE work."""
    loop = asyncio.get_running_loop()
    mid = int.from_bytes(os.urandom(2), "big")
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, registrar.sockaddr)
                await loop.sock_sendall(sock, coap_datagram.ping(mid))
                while True:  # a connected socket only hears the JRC
                    answer = await loop.sock_recv(sock, 2048)
                    if coap_datagram.answers_ping(answer, mid):
                        return None
        except TimeoutError:
            return f"no CoAP ping answer within {timeout:g} s"
        except OSError as exc:
            return os.strerror(exc.errno) if exc.errno else str(exc)


async def dtls_probe(registrar: UdpRegistrar, timeout: float) -> str | None:
    """Send one DTLS ClientHello; None if a HelloVerifyRequest or ServerHello came back,
    else why not (no answer, ICMP port unreachable, something that is not DTLS). A JPY port
    takes the hello as a JPY message (draft §4.5) under a random header of ours, and its
    answer counts only when it carries that header back."""
    loop = asyncio.get_running_loop()
    hello = dtls.probe_client_hello()
    header = os.urandom(16)
    if registrar.kind is UdpKind.JPY:
        hello = jpy.JpyMessage(header, hello).encode()
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, registrar.sockaddr)
                await loop.sock_sendall(sock, hello)
                while True:  # a connected socket only hears the registrar
                    answer = await loop.sock_recv(sock, dtls.MAX_DATAGRAM)
                    if _hello_answered(registrar.kind, header, answer):
                        return None
        except TimeoutError:
            return f"no DTLS answer within {timeout:g} s"
        except OSError as exc:
            return os.strerror(exc.errno) if exc.errno else str(exc)


def _hello_answered(kind: UdpKind, header: bytes, answer: bytes) -> bool:
    if kind is UdpKind.JPY:
        try:
            message = jpy.JpyMessage.decode(answer)
        except DecodeError:
            return False
        if message.header != header:
            return False
        answer = message.content
    return dtls.probe_answer(answer) is not None


Probe = Callable[[UdpRegistrar, float], Any]


@dataclass
class UdpState:
    registrar: UdpRegistrar
    seq: int
    sources: dict[str, float | None] = field(default_factory=dict)  # source -> expiry
    healthy: bool | None = None
    last_error: str | None = None
    last_probe: float | None = None


class ConstrainedRegistrars:
    """Every known constrained endpoint, its health, and the one the modes are given."""

    def __init__(self, *, log: logging.Logger, health_interval: float, health_timeout: float,
                 on_change: Callable[[], None], mode: str = "auto",
                 clock: Callable[[], float] = time.monotonic, probe: Probe = udp_probe,
                 on_health: Callable[[UdpRegistrar, bool | None], None] = lambda r, h: None,
                 ) -> None:
        """``on_health(endpoint, healthy)`` after each probe, with None when it is forgotten
        (the daemon's joinproxyd_constrained_registrar_up)."""
        self.on_health = on_health
        self.log = log
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.on_change = on_change
        self.mode = mode
        self._clock = clock
        self._probe = probe
        self._states: dict[UdpRegistrar, UdpState] = {}
        self._seq = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._chosen: RegistrarEndpoint | None = None
        self._lost_healthy = False  # a healthy endpoint was forgotten since the last choice

    # -- inputs ---------------------------------------------------------------------------------
    def set_static(self, registrars: Sequence[UdpRegistrar]) -> None:
        wanted = set(registrars)
        for reg, state in list(self._states.items()):
            if STATIC in state.sources and reg not in wanted:
                self._drop_source(state, STATIC, "no longer configured")
        for reg in registrars:
            self._learn(reg, STATIC, None)
        self._changed()

    def offer(self, registrar: UdpRegistrar, source: str, ttl: float | None) -> None:
        if ttl is not None and ttl <= 0:
            self.withdraw(registrar, source)
            return
        self._learn(registrar, source, None if ttl is None else self._clock() + ttl)
        self._changed()

    def withdraw(self, registrar: UdpRegistrar, source: str) -> None:
        state = self._states.get(registrar)
        if state is not None and source in state.sources:
            self._drop_source(state, source, f"withdrawn by {source}")
            self._changed()

    def _learn(self, registrar: UdpRegistrar, source: str, expiry: float | None) -> None:
        state = self._states.get(registrar)
        if state is None:
            self._seq += 1
            state = self._states[registrar] = UdpState(registrar, self._seq)
            self.log.info("constrained registrar %s learned from %s", registrar.key, source)
        state.sources[source] = expiry

    def _drop_source(self, state: UdpState, source: str, why: str) -> None:
        state.sources.pop(source, None)
        if not state.sources:
            del self._states[state.registrar]
            self._lost_healthy = self._lost_healthy or bool(state.healthy)
            self.on_health(state.registrar, None)
            self.log.info("constrained registrar %s forgotten: %s", state.registrar.key, why)

    def _expire(self) -> None:
        now = self._clock()
        for state in list(self._states.values()):
            for source, expiry in list(state.sources.items()):
                if expiry is not None and expiry <= now:
                    self._drop_source(state, source, f"{source} announcement expired")

    # -- the choice -----------------------------------------------------------------------------
    def choose(self) -> tuple[UdpKind | None, RegistrarEndpoint | None]:
        """The mode and the registrar for the constrained relays: healthy endpoints only;
        stateless first unless the operator forced a mode (draft §4.1); among equals, static
        before discovered, then the one known longest."""
        kinds = [UdpKind(self.mode)] if self.mode != "auto" else [UdpKind.JPY, UdpKind.COAPS]
        for kind in kinds:
            endpoint = self._best(kind)
            if endpoint is not None:
                return kind, endpoint
        return None, None

    def endpoint_for(self, kind: UdpKind) -> RegistrarEndpoint | None:
        """The registrar a relay of this kind is given: the chosen one when it offers the
        kind's port healthy, else the best healthy endpoint of that kind (a coaps link still
        relays when the chosen registrar offers only JPY), else None: nothing to relay to."""
        port = _PORT_FIELDS[kind]
        chosen = self._chosen
        if chosen is not None and getattr(chosen, port) is not None:
            return chosen
        return self._best(kind)

    def _best(self, kind: UdpKind) -> RegistrarEndpoint | None:
        healthy = [s for s in self._states.values() if s.healthy]
        picks = sorted((s for s in healthy if s.registrar.kind is kind),
                       key=lambda s: (STATIC not in s.sources, s.seq))
        if not picks:
            return None
        first = picks[0].registrar
        ports = {s.registrar.kind: s.registrar.port for s in healthy
                 if (s.registrar.address, s.registrar.scope_id)
                 == (first.address, first.scope_id)}
        source = STATIC if STATIC in picks[0].sources else next(iter(picks[0].sources))
        return RegistrarEndpoint(
            0 if source == STATIC else DISCOVERED_PREFERENCE, first.address, first.port,
            source=source, scope_id=first.scope_id, protocol=socket.IPPROTO_UDP,
            coaps_port=ports.get(UdpKind.COAPS), jpy_port=ports.get(UdpKind.JPY),
            cojp_port=ports.get(UdpKind.COJP))

    @property
    def chosen(self) -> RegistrarEndpoint | None:
        return self._chosen

    def _changed(self) -> None:
        lost, self._lost_healthy = self._lost_healthy, False
        self._reselect(health_changed=lost)
        self._wake.set()

    def _reselect(self, health_changed: bool = False) -> None:
        """Choose again; tell the control plane when the choice changed, or when any
        endpoint's health did (a relay of the other kind may be given another one)."""
        kind, endpoint = self.choose()
        old = self._chosen
        self._chosen = endpoint
        same = (old is None and endpoint is None) or (
            old is not None and endpoint is not None
            and (old.address, old.port, old.coaps_port, old.jpy_port, old.cojp_port)
            == (endpoint.address, endpoint.port, endpoint.coaps_port, endpoint.jpy_port,
                endpoint.cojp_port))
        if same:
            if health_changed:
                self._notify_change()
            return
        if endpoint is None:
            self.log.warning("no healthy constrained registrar")
        else:
            self.log.info("constrained registrar [%s] chosen for %s (coaps port %s, jpy port "
                          "%s)", endpoint.address, kind, endpoint.coaps_port, endpoint.jpy_port)
        self._notify_change()

    def _notify_change(self) -> None:
        try:
            self.on_change()
        except Exception:
            self.log.exception("constrained registrar change handler failed")

    # -- probing --------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="constrained-registrar-health")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._pass()
            except Exception:  # our bug: keep checking rather than go silent
                self.log.exception("constrained registrar health pass failed")
            await woken_or_timeout(self._wake, self.health_interval)

    async def _pass(self) -> None:
        self._expire()
        states = list(self._states.values())
        errors = await asyncio.gather(*(self._probe_one(s) for s in states))
        now = self._clock()
        flipped = False
        for state, error in zip(states, errors, strict=True):
            if self._states.get(state.registrar) is not state:
                continue  # forgotten while its probe was in flight
            healthy = error is None
            if healthy != state.healthy:
                flipped = True
                if healthy:
                    self.log.info("constrained registrar %s answers %s", state.registrar.key,
                                  "CoAP ping" if state.registrar.kind is UdpKind.COJP
                                  else "DTLS")
                else:
                    self.log.info("constrained registrar %s is down: %s", state.registrar.key,
                                  error)
            state.healthy, state.last_error, state.last_probe = healthy, error, now
            self.on_health(state.registrar, healthy)
        # an endpoint that expired at the start of this pass counts as a change too
        flipped, self._lost_healthy = flipped or self._lost_healthy, False
        self._reselect(health_changed=flipped)

    async def _probe_one(self, state: UdpState) -> str | None:
        try:
            return await self._probe(state.registrar, self.health_timeout)
        except Exception as exc:  # a probe bug must not end health checking for everyone
            self.log.exception("probe of %s failed", state.registrar.key)
            return f"probe failed: {exc}"

    # -- views ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        kind, chosen = self.choose()
        now, wall = self._clock(), time.time()
        # What each kind's relay is given (endpoint_for): the cojp relay's JRC may be another
        # host than the coaps/jpy choice, and is starred all the same.
        serving = {}
        for each in UdpKind:
            endpoint = self.endpoint_for(each)
            if endpoint is not None:
                serving[each] = (endpoint.address, endpoint.scope_id,
                                 getattr(endpoint, _PORT_FIELDS[each]))
        return {
            "mode_setting": self.mode,
            "mode": None if kind is None else str(kind),
            "chosen": None if chosen is None else {
                "address": chosen.address, "scope_id": chosen.scope_id,
                "coaps_port": chosen.coaps_port, "jpy_port": chosen.jpy_port,
                "cojp_port": chosen.cojp_port},
            "endpoints": [{
                "kind": str(s.registrar.kind), "address": s.registrar.address,
                "port": s.registrar.port, "scope_id": s.registrar.scope_id,
                "sources": sorted(s.sources), "healthy": s.healthy,
                "last_error": s.last_error,
                "used": serving.get(s.registrar.kind) == (s.registrar.address,
                                                          s.registrar.scope_id, s.registrar.port),
                "last_probe": None if s.last_probe is None else wall - (now - s.last_probe),
            } for s in sorted(self._states.values(), key=lambda s: s.seq)],
        }


class CoreRegistrarFinder:
    """Asks ``/.well-known/core?rt=brski.rjp`` and ``?rt=brski`` on ff05::fd and ff02::fd of
    the backbone every ``period`` seconds and takes every answer heard within ``wait``
    seconds (aiocoap's client keeps only the first answer to a multicast request, so the
    request goes out on a socket of ours and aiocoap only encodes and decodes). Each answer
    is offered for three periods: a registrar that stops answering is forgotten after its
    third missed round."""

    def __init__(self, *, interface: str, ifindex: int, period: float,
                 on_registrar: Callable[[UdpRegistrar, float], None],
                 log: logging.Logger, wait: float = 1.0,
                 refused: Callable[[], None] = lambda: None) -> None:
        """``refused()`` counts an answer dropped as malformed (the daemon's drop metric)."""
        self.refused = refused
        self.interface = interface
        self.ifindex = ifindex
        self.period = period
        self.on_registrar = on_registrar
        self.log = log
        self.wait = wait
        self._task: asyncio.Task[None] | None = None
        self.bad_answers = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="core-registrar-finder")
            self.log.info("asking CoRE discovery for constrained registrars on %s",
                          self.interface)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            for group in CORE_GROUPS:
                for query in CORE_QUERIES:
                    try:
                        await self._ask(group, query)
                    except OSError as exc:  # the link went away, ...: retried next period
                        self.log.debug("CoRE discovery on %s: %s", self.interface, exc)
            await asyncio.sleep(self.period)

    async def _ask(self, group: str, query: str) -> None:
        loop = asyncio.get_running_loop()
        token = os.urandom(4)
        request = aiocoap.Message(code=aiocoap.GET, uri_path=(".well-known", "core"),
                                  uri_query=(query,))
        # Our socket, so the message layer's fields are ours to set (a NON request).
        request.mtype, request.token = aiocoap.NON, token
        request.mid = int.from_bytes(os.urandom(2), "big")
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, self.ifindex)
            sock.bind(("::", 0, 0, self.ifindex))
            await loop.sock_sendto(sock, request.encode(), (group, COAP_PORT, 0, self.ifindex))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.wait):
                    while True:
                        data, sender = await loop.sock_recvfrom(sock, 65535)
                        self._answer(data, str(sender[0]), token)

    def _answer(self, data: bytes, sender: str, token: bytes) -> None:
        try:
            answer = aiocoap.Message.decode(data)
            if answer.token != token or not answer.code.is_successful():
                return  # not an answer to this request (or "no such thing here")
            found = udp_registrars_in_links(answer.payload, self.ifindex)
        except (DecodeError, aiocoap.error.UnparsableMessage) as exc:
            self.bad_answers += 1
            self.refused()
            if self.bad_answers == 1:
                self.log.warning("CoRE discovery answer from %s dropped: %s (further ones are "
                                 "counted only)", sender, exc)
            return
        for registrar in found:
            try:
                self.on_registrar(registrar, 3 * self.period)
            except Exception:
                self.log.exception("constrained registrar handler failed for %s",
                                   registrar.key)


class ConstrainedDiscovery:
    """What the daemon holds for constrained registrars: the table, and its CoRE and mDNS
    finders on the backbone (GRASP floods come through the daemon's GRASP listener,
    :meth:`grasp_flood`). Kept in one place so the control plane wires it in a few lines."""

    def __init__(self, *, static: Sequence[RegistrarEndpoint], health_interval: float,
                 health_timeout: float, mode: str, on_change: Callable[[], None],
                 metrics: Any, log: logging.Logger, probe: Probe = udp_probe) -> None:
        self.metrics = metrics
        self.log = log
        self.table = ConstrainedRegistrars(log=log, health_interval=health_interval,
                                           health_timeout=health_timeout, mode=mode,
                                           on_change=on_change, probe=probe,
                                           on_health=self._export_health)
        self.table.set_static(static_udp_registrars(static))
        self.finder: CoreRegistrarFinder | None = None
        self.browser: MdnsRegistrarBrowser | None = None  # _brski-registrar._udp
        self._where: tuple[str, int] | None = None

    @property
    def chosen(self) -> RegistrarEndpoint | None:
        return self.table.chosen

    def _export_health(self, registrar: UdpRegistrar, healthy: bool | None) -> None:
        gauge = getattr(self.metrics, "constrained_up", None)
        if gauge is None:  # a metrics stand-in without it (unit tests)
            return
        labels = (registrar.key, str(registrar.kind))
        if healthy is None:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        else:
            gauge.labels(*labels).set(int(healthy))

    def endpoint_for(self, kind: str) -> RegistrarEndpoint | None:
        return self.table.endpoint_for(UdpKind(kind))

    def reconfigure(self, static: Sequence[RegistrarEndpoint], health_interval: float,
                    health_timeout: float, mode: str) -> None:
        self.table.health_interval, self.table.health_timeout = health_interval, health_timeout
        self.table.mode = mode
        self.table.set_static(static_udp_registrars(static))

    def grasp_flood(self, flood: wire.Flood, ifindex: int) -> int:
        found = udp_registrars_in_flood(flood, ifindex)
        for registrar in found:
            self.table.offer(registrar, "grasp", flood.ttl_ms / 1000.0)
        return len(found)

    async def start(self) -> None:
        await self.table.start()

    async def reconcile_backbone(self, interface: str, index: int | None, *, core: bool,
                                 mdns: bool, core_interval: float) -> None:
        """Run the CoRE and mDNS finders on the backbone while wanted and it is usable."""
        where = None if index is None else (interface, index)
        if where != self._where or not core or (
                self.finder is not None and self.finder.period != core_interval):
            await self._stop_finder()
        if where != self._where or not mdns:
            await self._stop_browser()
        self._where = where
        if where is None:
            return
        if core and self.finder is None:
            finder = CoreRegistrarFinder(
                interface=interface, ifindex=where[1], period=core_interval, log=self.log,
                on_registrar=lambda reg, ttl: self.table.offer(reg, CORE, ttl),
                refused=lambda: self.metrics.drop("discovery", DropReason.MALFORMED))
            try:
                await finder.start()
            except OSError as exc:
                self.log.warning("CoRE discovery on %s cannot start: %s", interface, exc)
            else:
                self.finder = finder
        if mdns and self.browser is None:
            def found(endpoint: RegistrarEndpoint, ttl: float | None) -> None:
                self.table.offer(_as_coaps(endpoint), METHOD, ttl)

            def gone(endpoint: RegistrarEndpoint) -> None:
                self.table.withdraw(_as_coaps(endpoint), METHOD)

            browser = MdnsRegistrarBrowser(
                interface=interface, ifindex=where[1], on_registrar=found, on_gone=gone,
                metrics=self.metrics, log=self.log, service=CONSTRAINED_REGISTRAR_SERVICE)
            try:
                await browser.start()
            except (OSError, RuntimeError) as exc:
                self.log.warning("mDNS browse for constrained registrars on %s cannot start: "
                                 "%s", interface, exc)
            else:
                self.browser = browser

    async def _stop_finder(self) -> None:
        if self.finder is not None:
            await self.finder.stop()
            self.finder = None

    async def _stop_browser(self) -> None:
        if self.browser is not None:
            await self.browser.stop()
            self.browser = None

    async def stop(self) -> None:
        await self._stop_finder()
        await self._stop_browser()
        await self.table.stop()

    def status(self) -> dict[str, Any]:
        return {**self.table.status(),
                "finders": [name for name, on in (("coap", self.finder), ("mdns", self.browser))
                            if on is not None],
                "core_answers_dropped": 0 if self.finder is None else self.finder.bad_answers}


def _as_coaps(endpoint: RegistrarEndpoint) -> UdpRegistrar:
    # _brski-registrar._udp names the registrar's CoAPS port (registrar/announce.py).
    return UdpRegistrar.make(UdpKind.COAPS, endpoint.address, endpoint.port, endpoint.scope_id)
