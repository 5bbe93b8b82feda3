"""DNS-SD over mDNS (RFC 8995 App. B): advertise ``_brski-proxy._tcp`` on the join links and
browse ``_brski-registrar._tcp`` on the backbone, with python-zeroconf's asyncio API.

One Zeroconf instance per interface, each confined to its interface. Zeroconf restricts where
it *sends* when given interface indexes, but in 0.154 its shared listen socket is bound to
[::]:5353 and so hears mDNS from every interface the host has joined ff02::fb on: a pledge on
a join link could answer our registrar browse, and a query on join1 could be answered with
join0's proxy address. So each instance's sockets get SO_BINDTODEVICE right after zeroconf
creates them, before the event loop has run once (zeroconf offers no hook for it; see
``confine``). Interfaces are passed as ifindex, never as an address: zeroconf maps an address
to the *first* adapter that has it, and every join link may carry the same fe80::1.

Link-local answers: zeroconf 0.154 gives a received link-local AAAA record the scope id of the
interface it arrived on (``parsed_scoped_addresses``/``scope_id``), and the AAAA record we
publish carries just the 16 address bytes, so each join link's instance publishes its own
link-local address.

Registrars found by mDNS are offered with no ttl: zeroconf refreshes its cache at 80 % of the
record ttl without telling us, and reports Removed on a goodbye or when the records lapse, so
the browser withdraws them (``on_gone``) rather than letting a ttl run out under them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from zeroconf import IPVersion, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from ..aio import cancel_and_wait, woken_or_timeout
from ..metrics import Metrics
from ..model import JoinInterface, RegistrarEndpoint
from .grasp import usable_address
from .registry import DISCOVERED_PREFERENCE
from .target import AnnounceTarget

PROXY_SERVICE: Final = "_brski-proxy._tcp.local."
REGISTRAR_SERVICE: Final = "_brski-registrar._tcp.local."
CONSTRAINED_REGISTRAR_SERVICE: Final = "_brski-registrar._udp.local."  # its CoAPS port
METHOD: Final = "mdns"
# RFC 6763 §6.1: a service with no TXT data still has a TXT record, holding one empty
# string (a single zero byte); zeroconf would send an empty RDATA for properties={}.
EMPTY_TXT: Final = b"\x00"
RESOLVE_TIMEOUT_MS: Final = 3000
RETRY_SECONDS: Final = 10.0  # after a failed registration (the link may still be settling)
CLOSE_TIMEOUT: Final = 5.0


def confine(zc: Zeroconf, ifname: str) -> None:
    """Bind every socket of `zc` to `ifname`, so it neither hears nor answers other links.

    Reaches into zeroconf's engine (``_listen_socket``, ``_respond_sockets``, present in 0.154):
    if a later version renames them this raises rather than silently listening everywhere.
    """
    engine = zc.engine
    try:
        listen = engine._listen_socket
        respond = list(engine._respond_sockets)
    except AttributeError as exc:
        raise RuntimeError(f"this zeroconf cannot be confined to {ifname}: {exc}") from None
    if not respond:
        raise OSError(f"zeroconf found no usable IPv6 address on {ifname}")
    for sock in [listen, *respond]:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())


async def open_zeroconf(ifname: str, ifindex: int) -> AsyncZeroconf:
    """An IPv6-only AsyncZeroconf on one interface, running on this loop (no thread)."""
    aiozc = AsyncZeroconf(interfaces=[ifindex], ip_version=IPVersion.V6Only)
    try:
        confine(aiozc.zeroconf, ifname)
    except BaseException:
        await aiozc.async_close()
        raise
    return aiozc


async def close_zeroconf(aiozc: AsyncZeroconf, log: logging.Logger) -> None:
    """Goodbyes for what it registered, then close; bounded, and never raises."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await aiozc.async_close()
    except Exception as exc:
        log.debug("closing zeroconf: %s", exc)


def _dns_label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-")[:63] or "joinproxyd"


# -- the proxy advertisement on join links ------------------------------------------------------
@dataclass
class _Advert:
    target: AnnounceTarget
    aiozc: AsyncZeroconf
    info: ServiceInfo
    registered: bool = False


class MdnsProxyAdvertiser:
    """Registers ``<host>-<iface>._brski-proxy._tcp.local.`` on each target join link while
    enabled; withdraws it (goodbye packets) when disabled, dropped from the targets, or stopped.
    """

    def __init__(self, *, metrics: Metrics, log: logging.Logger,
                 hostname: str | None = None) -> None:
        self.metrics = metrics
        self.log = log
        self.hostname = _dns_label(hostname or socket.gethostname())
        self._targets: dict[str, AnnounceTarget] = {}
        self._enabled = False
        self._adverts: dict[str, _Advert] = {}
        self._retry_at: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def set_targets(self, interfaces: Sequence[JoinInterface]) -> None:
        # _brski-proxy._tcp names a TCP port: a link served only over UDP (coaps) is not it.
        wanted = {i.name: t for i in interfaces if 6 in (t := AnnounceTarget.of(i)).protocols}
        if wanted != self._targets:
            self._targets = wanted
            self._retry_at.clear()
            self._wake.set()

    def set_enabled(self, enabled: bool) -> None:
        if enabled != self._enabled:
            self._enabled = enabled
            self._retry_at.clear()
            self._wake.set()

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="mdns-advertiser")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await asyncio.gather(*(self._withdraw(name) for name in list(self._adverts)))

    def status(self) -> dict[str, Any]:
        return {"enabled": self._enabled,
                "registered": sorted(n for n, a in self._adverts.items() if a.registered)}

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            desired = self._targets if self._enabled else {}
            try:
                stale = [n for n, a in self._adverts.items() if desired.get(n) != a.target]
                await asyncio.gather(*(self._withdraw(n) for n in stale))
                now = loop.time()
                new = [t for n, t in desired.items()
                       if n not in self._adverts and self._retry_at.get(n, 0.0) <= now]
                await asyncio.gather(*(self._register(t) for t in new))
            except Exception:  # our bug: say so, and try again rather than go silent
                self.log.exception("mDNS advertiser pass failed")
                await asyncio.sleep(1)
                self._wake.set()
            retries = [t for n, t in self._retry_at.items() if n in desired]
            timeout = max(0.0, min(retries) - loop.time()) if retries else None
            await woken_or_timeout(self._wake, timeout)

    def _service_info(self, target: AnnounceTarget) -> ServiceInfo:
        label = _dns_label(f"{self.hostname}-{target.name}")
        return ServiceInfo(PROXY_SERVICE, f"{label}.{PROXY_SERVICE}", port=target.port,
                           server=f"{label}.local.", parsed_addresses=list(target.addresses),
                           properties=EMPTY_TXT, interface_index=target.index)

    async def _register(self, target: AnnounceTarget) -> None:
        try:
            aiozc = await open_zeroconf(target.name, target.index)
        except Exception as exc:  # OSError, or zeroconf's RuntimeError for a missing adapter
            self._failed(target, exc)
            return
        advert = self._adverts[target.name] = _Advert(target, aiozc, self._service_info(target))
        try:
            # Probing for the name; once it returns, queries are answered.
            announcing = await aiozc.async_register_service(advert.info,
                                                            allow_name_change=True)
        except Exception as exc:  # OSError, a name conflict, or another zeroconf Error
            self._failed(target, exc)
            await self._withdraw(target.name)
            return
        advert.registered = True
        self.metrics.announcements.labels(METHOD, target.name).inc()
        self.log.info("mDNS: %s registered on %s ([%s]:%d)", advert.info.name, target.name,
                      target.link_local, target.port, extra={"INTERFACE": target.name})
        await announcing  # the unsolicited announcements (RFC 6762 §8.3)

    def _failed(self, target: AnnounceTarget, exc: Exception) -> None:
        self._retry_at[target.name] = asyncio.get_running_loop().time() + RETRY_SECONDS
        self.log.error("mDNS: cannot advertise the proxy on %s (retry in %g s): %s",
                       target.name, RETRY_SECONDS, exc, extra={"INTERFACE": target.name})

    async def _withdraw(self, name: str) -> None:
        advert = self._adverts.pop(name, None)
        if advert is not None:
            await close_zeroconf(advert.aiozc, self.log)
            if advert.registered:
                self.log.info("mDNS: proxy advertisement on %s withdrawn", name,
                              extra={"INTERFACE": name})


# -- the registrar browser on the backbone ------------------------------------------------------
class MdnsRegistrarBrowser:
    """Browses ``_brski-registrar._tcp.local.`` on the backbone; every IPv6 address of a
    resolved instance is offered as RegistrarEndpoint(source "mdns")."""

    def __init__(self, *, interface: str, ifindex: int,
                 on_registrar: Callable[[RegistrarEndpoint, float | None], None],
                 on_gone: Callable[[RegistrarEndpoint], None],
                 metrics: Metrics, log: logging.Logger,
                 service: str = REGISTRAR_SERVICE) -> None:
        """``service``: ``_brski-registrar._udp.local.`` finds constrained registrars."""
        self.service = service
        self.interface = interface
        self.ifindex = ifindex
        self.on_registrar = on_registrar
        self.on_gone = on_gone
        self.metrics = metrics
        self.log = log
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._found: dict[str, set[RegistrarEndpoint]] = {}  # instance name -> endpoints
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()  # changed again while being resolved

    async def start(self) -> None:
        if self._aiozc is not None:
            return
        self._aiozc = await open_zeroconf(self.interface, self.ifindex)
        self._browser = AsyncServiceBrowser(self._aiozc.zeroconf, [self.service],
                                            handlers=[self._on_event])
        self.log.info("browsing mDNS for %s on %s", self.service, self.interface,
                      extra={"INTERFACE": self.interface})

    async def stop(self) -> None:
        """Stop browsing. What was reported stays reported: the owner withdraws it if it
        wants to (the daemon stops browsing only to restart it, or to exit)."""
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        await asyncio.gather(*(cancel_and_wait(t) for t in list(self._resolving.values())))
        self._resolving.clear()
        if self._aiozc is not None:
            await close_zeroconf(self._aiozc, self.log)
            self._aiozc = None

    def found(self) -> dict[str, list[str]]:
        return {name: sorted(e.key for e in eps) for name, eps in self._found.items()}

    # zeroconf calls handlers with these keyword names.
    def _on_event(self, zeroconf: Zeroconf, service_type: str, name: str,
                  state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            self.log.debug("mDNS: registrar %s removed", name)
            self._update(name, set())
            return
        if name in self._resolving:
            self._again.add(name)
            return
        self._resolving[name] = asyncio.create_task(self._resolve(name),
                                                    name=f"mdns-resolve {name}")

    async def _resolve(self, name: str) -> None:
        try:
            while True:
                self._again.discard(name)
                assert self._aiozc is not None
                info = AsyncServiceInfo(self.service, name)
                if await info.async_request(self._aiozc.zeroconf, RESOLVE_TIMEOUT_MS):
                    self.metrics.discovery_messages.labels(METHOD).inc()
                    self._update(name, self._endpoints(info))
                else:
                    self.log.debug("mDNS: registrar %s did not resolve", name)
                if name not in self._again:
                    break
        except asyncio.CancelledError:
            raise
        except Exception:  # a zeroconf or handler bug: log it, keep browsing
            self.log.exception("mDNS: resolving %s failed", name)
        finally:
            self._resolving.pop(name, None)

    def _endpoints(self, info: AsyncServiceInfo) -> set[RegistrarEndpoint]:
        port = info.port
        if not port or not 0 < port < 65536:
            return set()
        out = set()
        for address in info.ip_addresses_by_version(IPVersion.V6Only):
            plain = ipaddress.IPv6Address(str(address).split("%")[0])
            if not usable_address(plain):
                continue
            scope = 0
            if plain.is_link_local:
                heard_on = getattr(address, "scope_id", None)
                if heard_on not in (None, "", str(self.ifindex), self.interface):
                    continue  # heard on another link: not reachable through the backbone
                scope = self.ifindex
            out.add(RegistrarEndpoint(DISCOVERED_PREFERENCE, plain.compressed, port,
                                      source=METHOD, scope_id=scope))
        return out

    def _update(self, name: str, endpoints: set[RegistrarEndpoint]) -> None:
        old = self._found.pop(name, set())
        if endpoints:
            self._found[name] = endpoints
        still = {e for eps in self._found.values() for e in eps}
        for endpoint in old - still:
            self._call(self.on_gone, endpoint)
        for endpoint in endpoints - old:
            self.log.info("mDNS: registrar %s (%s) on %s", endpoint.key, name, self.interface,
                          extra={"REGISTRAR": endpoint.key})
        for endpoint in endpoints:
            self._call(self.on_registrar, endpoint, None)

    def _call(self, handler: Callable[..., None], *args: Any) -> None:
        try:
            handler(*args)
        except Exception:
            self.log.exception("mDNS registrar handler failed")
