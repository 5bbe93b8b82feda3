"""The registrar's HTTPS client to MASAs (RFC 8995 §2.3.2, §5.5, §5.8).

The MASA is named by the IDevID's MASA URL extension, usually a bare authority
("masa.example:9443" -> https://masa.example:9443/.well-known/brski). ``[masa.override]``
maps an authority to another ``address`` (the TLS name checked is still the authority's host,
so a lab can reach "masa.example" at ``[::1]:9443``) or to a whole other ``url``, with its own
TLS trust anchors. The address mapping is done in the resolver, so the URL, the SNI and the
certificate name check all keep the authority's name.

``MasaUnreachable`` means "try again later" (connection refused, timeout, TLS failure,
5xx): the registrar answers the pledge 202 + Retry-After. A 4xx from the MASA is a decision and
comes back as a ``MasaAnswer``.
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from .config import MasaRoute, RegistrarConfig
from .web import MEDIA_JSON, MEDIA_VOUCHER_CMS, client_ssl_context

log = logging.getLogger(__name__)
WELL_KNOWN = "/.well-known/brski"


class MasaUnreachable(Exception):
    """The MASA could not be asked (or answered 5xx): retry later."""


class NoMasa(Exception):
    """The IDevID names no usable MASA."""


@dataclass(frozen=True)
class MasaAnswer:
    status: int
    body: bytes
    content_type: str


@dataclass(frozen=True)
class MasaTarget:
    base_url: str  # https://authority/.well-known/brski
    ssl: ssl.SSLContext
    authority: str


def masa_base_url(masa_url: str) -> str:
    """RFC 8995 §2.3.2: an authority gets https:// and /.well-known/brski; a URL without a
    path gets the well-known path; a URL with a path is used as the base as it is."""
    if "://" not in masa_url:
        return f"https://{masa_url.rstrip('/')}{WELL_KNOWN}"
    parts = urlsplit(masa_url)
    if parts.scheme != "https":
        raise NoMasa(f"MASA URL {masa_url!r} is not https (RFC 8995 §2.3.2)")
    path = parts.path.rstrip("/")
    return f"https://{parts.netloc}{path or WELL_KNOWN}"


def authority_of(masa_url: str) -> str:
    rest = masa_url.split("://", 1)[1] if "://" in masa_url else masa_url
    return rest.split("/", 1)[0]


def _split_authority(authority: str) -> tuple[str, int]:
    host, sep, port = authority.rpartition(":")
    if not sep or "]" in port:
        return authority.strip("[]"), 443
    return host.strip("[]"), int(port)


class _OverrideResolver(AbstractResolver):
    """Resolves overridden MASA host names to their configured addresses."""

    def __init__(self, mapping: dict[tuple[str, int], tuple[str, int]]) -> None:
        self._mapping = mapping
        self._system = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        target = self._mapping.get((host, port))
        if target is None:
            return await self._system.resolve(host, port, family)
        results = await self._system.resolve(target[0], target[1], socket.AF_UNSPEC)
        return [{**r, "hostname": host} for r in results]  # type: ignore[typeddict-item]

    async def close(self) -> None:
        await self._system.close()


class MasaClient:
    def __init__(self, config: RegistrarConfig) -> None:
        self.config = config
        self._default_ssl = client_ssl_context(config.masa_ca_certs)
        self._routes: dict[str, tuple[MasaRoute, ssl.SSLContext]] = {}
        mapping: dict[tuple[str, int], tuple[str, int]] = {}
        for authority, route in config.masa_overrides.items():
            ctx = client_ssl_context(route.ca_certs) if route.ca_certs else self._default_ssl
            self._routes[authority] = (route, ctx)
            if route.address is not None:
                mapping[_split_authority(authority)] = route.address
        self._resolver = _OverrideResolver(mapping)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(resolver=self._resolver, use_dns_cache=False)
        timeout = aiohttp.ClientTimeout(total=self.config.masa_timeout)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def target(self, masa_url: str) -> MasaTarget:
        authority = authority_of(masa_url)
        route = self._routes.get(authority)
        if route is None:
            return MasaTarget(masa_base_url(masa_url), self._default_ssl, authority)
        config, ctx = route
        if config.url is not None:
            return MasaTarget(masa_base_url(config.url), ctx, authority)
        return MasaTarget(masa_base_url(masa_url), ctx, authority)

    async def post(self, masa_url: str, endpoint: str, body: bytes, accept: str,
                   content_type: str = MEDIA_VOUCHER_CMS) -> MasaAnswer:
        if self._session is None:
            raise RuntimeError("MasaClient.start() was not called")
        target = self.target(masa_url)
        url = f"{target.base_url}/{endpoint}"
        headers = {"Content-Type": content_type, "Accept": accept}
        try:
            async with self._session.post(url, data=body, headers=headers,
                                          ssl=target.ssl) as response:
                data = await response.read()
                content_type = response.content_type
                status = response.status
        except (TimeoutError, aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            raise MasaUnreachable(f"{url}: {type(exc).__name__}: {exc}") from exc
        if status >= 500:
            raise MasaUnreachable(f"{url}: HTTP {status}: {data[:200]!r}")
        log.debug("MASA %s answered %d (%s, %d bytes)", url, status, content_type, len(data))
        return MasaAnswer(status, data, content_type)

    async def request_voucher(self, masa_url: str, rvr: bytes,
                              media: str = MEDIA_VOUCHER_CMS) -> MasaAnswer:
        """``media``: the RVR's type, also the voucher's we accept (CMS or COSE)."""
        return await self.post(masa_url, "requestvoucher", rvr, media, media)

    async def request_audit_log(self, masa_url: str, rvr: bytes) -> MasaAnswer:
        return await self.post(masa_url, "requestauditlog", rvr, MEDIA_JSON)
