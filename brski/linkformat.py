"""CoRE link-format (RFC 6690) documents used in cBRSKI discovery, as typed values.

What the pledge sees when it asks ``GET coap://[ff02::fd]/.well-known/core?brski-jp=*``
(cBRSKI §10, join-proxy draft §5.5)::

    <>;brski-jp=8485                          the join port on the responder's address
    <>;brski-jp="63245"                       the same, quoted
    <coaps://[fe80::1]:8485>;rt=brski.jp      legacy form (join-proxy <= -19, cBRSKI <= -30)

What the join proxy sees when it looks for a registrar (join-proxy draft §5.1–5.4)::

    <coaps://[2001:db8:0:abcd::52]/b>;rt=brski            stateful, port omitted => 5684
    <jpy://[2001:db8:0:abcd::52]:7634>;rt=brski.rjp        stateless; jpy needs a port

Parsing is aiocoap's (``aiocoap.util.linkformat``); links that are none of the above are
skipped, links that claim to be one of them but are malformed raise DecodeError, and links that
are well-formed but unusable by a join proxy (a host name instead of an address) raise
ValidationError. Emission writes tokens unquoted, so the drafts' examples come out byte-exact.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Final
from urllib.parse import SplitResult, urlsplit

from aiocoap.util import linkformat

from .errors import DecodeError, UsageError, ValidationError

COAPS_DEFAULT_PORT: Final = 5684
# Discovery answers are a few links; the cap also bounds the parser's work.
MAX_LINKFORMAT_SIZE: Final = 8192
# aiocoap's (vendored link_header) link regex backtracks polynomially on a '<' followed by a
# long run of spaces and no '>': 8 KiB of that took ~60 s. RFC 6690 allows no whitespace
# outside quoted strings, so a long run of spaces is refused before the parser sees it.
_LONG_SPACE_RUN = re.compile(" {17,}")

RT_REGISTRAR: Final = "brski"
RT_REGISTRAR_JPY: Final = "brski.rjp"
RT_LEGACY_JOIN_PROXY: Final = "brski.jp"
ATTR_JOIN_PORT: Final = "brski-jp"

_PORT_TEXT = re.compile(r"[0-9]{1,5}")
# Written without quotes: RFC 9110 tchar plus "/". RFC 6690's ptoken allows more ("<", ">",
# ":", "=", "()", "[]", "{}", "?", "@"), but the parser we use (aiocoap's) then misreads the
# document, so those values are quoted; what we write must parse back to the same links.
_PTOKEN = re.compile(r"[!#$%&'*+\-./0-9A-Z^_`a-z|~]+")
_PARMNAME = re.compile(r"[!#$&+\-.^_`|~0-9A-Za-z]+")  # RFC 8288 §3

Address = IPv6Address | IPv4Address
Params = tuple[tuple[str, str | None], ...]


class RegistrarKind(StrEnum):
    STATEFUL = "stateful"  # coaps, rt=brski: the proxy relays UDP per pledge
    STATELESS = "stateless"  # jpy, rt=brski.rjp: the proxy wraps datagrams in JPY messages


_KINDS: Final = frozenset(kind.value for kind in RegistrarKind)


def _check_port(port: object) -> int:
    if type(port) is not int or not 0 < port <= 0xFFFF:
        raise UsageError(f"port {port!r} is not 1..65535")
    return port


def _authority(address: Address, port: int | None) -> str:
    host = f"[{address}]" if address.version == 6 else str(address)
    return host if port is None else f"{host}:{port}"


@dataclass(frozen=True)
class JoinPortLink:
    """A join port offered to pledges. ``address`` None (the current form): the port is on
    the address the discovery response came from, and the pledge MUST use that. With an address,
    the legacy ``rt=brski.jp`` form. ``params``: the link's other attributes, which the draft
    expects future specs to use for telling variants apart (e.g. ``var="c509 v2"``)."""

    port: int
    address: Address | None = None
    params: Params = ()

    def __post_init__(self) -> None:
        _check_port(self.port)
        if self.address is not None and not isinstance(self.address, IPv6Address | IPv4Address):
            raise UsageError("address must be an IPv6Address, IPv4Address or None")

    @property
    def legacy(self) -> bool:
        return self.address is not None

    def to_link(self) -> str:
        if self.address is None:
            return _format_link("", [(ATTR_JOIN_PORT, str(self.port)), *self.params])
        href = f"coaps://{_authority(self.address, self.port)}"
        return _format_link(href, [("rt", RT_LEGACY_JOIN_PROXY), *self.params])


@dataclass(frozen=True)
class RegistrarLink:
    """Where a join proxy relays to. ``path`` is kept for completeness; the proxy does not
    use it (join-proxy §5.3), and for jpy it MUST be ignored (§4.5.1), so it is empty there."""

    kind: RegistrarKind
    address: Address
    port: int
    path: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise UsageError(f"registrar kind {self.kind!r} is not stateful or stateless")
        object.__setattr__(self, "kind", RegistrarKind(self.kind))
        if not isinstance(self.address, IPv6Address | IPv4Address):
            raise UsageError("address must be an IPv6Address or IPv4Address")
        _check_port(self.port)
        if not isinstance(self.path, str) or (self.path and not self.path.startswith("/")):
            raise UsageError("path must be empty or start with '/'")

    def to_link(self) -> str:
        if self.kind is RegistrarKind.STATELESS:
            href = f"jpy://{_authority(self.address, self.port)}"
            return _format_link(href, [("rt", RT_REGISTRAR_JPY)])
        port = None if self.port == COAPS_DEFAULT_PORT else self.port
        href = f"coaps://{_authority(self.address, port)}{self.path}"
        return _format_link(href, [("rt", RT_REGISTRAR)])


DiscoveryLink = JoinPortLink | RegistrarLink


def _format_link(href: str, params: Iterable[tuple[str, str | None]]) -> str:
    parts = [f"<{href}>"]
    for name, value in params:
        if not _PARMNAME.fullmatch(name):
            raise UsageError(f"link parameter name {name!r} is not a token")
        if value is not None and "\\" in value:
            # the parser does not undo \\ escapes: such a value would not read back the same
            raise UsageError(f"link parameter {name}: a backslash cannot be written")
        if value is None:
            parts.append(name)
        elif _PTOKEN.fullmatch(value):
            parts.append(f"{name}={value}")
        else:
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            parts.append(f'{name}="{escaped}"')
    return ";".join(parts)


def format_links(links: Iterable[DiscoveryLink]) -> str:
    """A link-format document (Content-Format 40) from typed links, comma-separated."""
    items = list(links)
    if not all(isinstance(link, JoinPortLink | RegistrarLink) for link in items):
        raise UsageError("format_links takes JoinPortLink and RegistrarLink objects")
    return ",".join(link.to_link() for link in items)


def link_matches(link: DiscoveryLink, query: str) -> bool:
    """Whether ``link`` passes one RFC 6690 §4.1 filter query (a Uri-Query option value such
    as ``rt=brski``, ``rt=brski*`` or ``href=coaps*``). A trailing ``*`` is a prefix match;
    attribute values that are space-separated lists (``rt``, ``if``) match on any one item; a
    link without the attribute does not match. A query that is not ``name=value`` is no
    filter (RFC 6690 defines no other) and matches every link."""
    name, sep, pattern = query.partition("=")
    if not sep:
        return True
    prefix = pattern.endswith("*")
    wanted = pattern[:-1] if prefix else pattern

    def hit(value: str) -> bool:
        return value.startswith(wanted) if prefix else value == wanted

    # Matched on the link as written, read back by the parser clients use.
    [parsed] = linkformat.parse(link.to_link()).links
    if name == "href":
        return hit(parsed.href)
    values = [v for k, v in parsed.attr_pairs if str(k).lower() == name.lower() and v is not None]
    return any(hit(item) for value in values for item in value.split(" "))


def filter_links(links: Iterable[DiscoveryLink], queries: Iterable[str]) -> list[DiscoveryLink]:
    """The links that pass every filter query (RFC 6690 §4.1; several queries: all of them)."""
    wanted = list(queries)
    return [link for link in links if all(link_matches(link, q) for q in wanted)]


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_links(payload: bytes | str) -> list[DiscoveryLink]:
    """Every cBRSKI discovery link in a link-format document, in document order."""
    if isinstance(payload, bytes | bytearray):
        if len(payload) > MAX_LINKFORMAT_SIZE:
            raise DecodeError(f"link-format document of {len(payload)} bytes is too long")
        try:
            text = bytes(payload).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("link-format document is not UTF-8") from exc
    elif isinstance(payload, str):
        text = payload
    else:
        raise UsageError("parse_links takes bytes or str")
    if len(text) > MAX_LINKFORMAT_SIZE:
        raise DecodeError(f"link-format document of {len(text)} characters is too long")
    if _LONG_SPACE_RUN.search(text):
        raise DecodeError("link-format document has a run of more than 16 spaces")
    try:
        document = linkformat.parse(text)
    except Exception as exc:  # the vendored parser's ParseException, or worse on odd input
        raise DecodeError(f"not an RFC 6690 link-format document{_where(exc, text)}") from exc
    found: list[DiscoveryLink] = []
    for link in document.links:
        typed = _typed(link.href, [(str(k), v) for k, v in link.attr_pairs])
        if isinstance(typed, JoinPortLink):
            _check_kept_params(typed.params)
        if typed is not None:
            found.append(typed)
    return found


def parse_join_ports(payload: bytes | str) -> list[JoinPortLink]:
    return [link for link in parse_links(payload) if isinstance(link, JoinPortLink)]


def parse_registrars(payload: bytes | str) -> list[RegistrarLink]:
    return [link for link in parse_links(payload) if isinstance(link, RegistrarLink)]


def _single(pairs: Sequence[tuple[str, str | None]], name: str) -> str | None:
    values = [v for k, v in pairs if k.lower() == name]
    if len(values) > 1:
        raise DecodeError(f"link has {len(values)} {name!r} attributes")
    if values and values[0] is None:
        raise DecodeError(f"link attribute {name!r} has no value")
    return values[0] if values else None


def _typed(href: str, pairs: list[tuple[str, str | None]]) -> DiscoveryLink | None:
    join_port = _single(pairs, ATTR_JOIN_PORT)
    if join_port is not None:
        if not _PORT_TEXT.fullmatch(join_port) or not 0 < int(join_port) <= 0xFFFF:
            raise DecodeError(f"brski-jp value {join_port!r} is not a port number")
        rel = _single(pairs, "rel")
        if rel is not None and "hosts" not in rel.split():
            # The attribute is defined on "hosts" links only (RFC 6690's default relation).
            raise DecodeError(f"brski-jp on a link with rel={rel!r}")
        others = tuple((k, v) for k, v in pairs if k.lower() != ATTR_JOIN_PORT)
        return JoinPortLink(int(join_port), None, others)

    rt = _single(pairs, "rt")
    ours = [t for t in (rt or "").split()
            if t in (RT_REGISTRAR, RT_REGISTRAR_JPY, RT_LEGACY_JOIN_PROXY)]
    if not ours:
        return None  # somebody else's resource
    if len(ours) > 1:
        raise DecodeError(f"link claims several cBRSKI resource types: {' '.join(ours)}")
    kind = ours[0]
    if kind == RT_REGISTRAR_JPY:
        address, port, _ = _split_uri(href, "jpy", None)
        return RegistrarLink(RegistrarKind.STATELESS, address, port)
    if kind == RT_REGISTRAR:
        address, port, path = _split_uri(href, "coaps", COAPS_DEFAULT_PORT)
        return RegistrarLink(RegistrarKind.STATEFUL, address, port, path)
    address, port, _ = _split_uri(href, "coaps", COAPS_DEFAULT_PORT)
    others = tuple((k, v) for k, v in pairs if k.lower() != "rt")
    return JoinPortLink(port, address, others)


def _where(exc: Exception, text: str) -> str:
    # The parser's own text is its internals ("link_header.parse() failed near %s"); it
    # passes the unread rest of the document as its second argument: say where that starts.
    rest = exc.args[1] if len(exc.args) == 2 and isinstance(exc.args[1], str) else None
    if rest is None:
        return ""
    try:
        rest = ast.literal_eval(rest)
    except (ValueError, SyntaxError):
        return ""
    if not isinstance(rest, str) or not text.endswith(rest):
        return ""
    return f": cannot read on from character {len(text) - len(rest)} ({rest[:20]!r})"


def _check_kept_params(params: Params) -> None:
    """A join port link keeps its other parameters: refuse those it could not write back."""
    for name, value in params:
        if not _PARMNAME.fullmatch(name):
            raise DecodeError(f"link parameter name {name[:40]!r} is not a token (RFC 8288 §3)")
        if value is not None and "\\" in value:
            raise DecodeError(f"link parameter {name} holds a backslash escape, which the "
                              "link-format parser does not undo")


def _split_uri(href: str, scheme: str, default_port: int | None) -> tuple[Address, int, str]:
    try:
        parts: SplitResult = urlsplit(href)
        port = parts.port  # raises ValueError when not a number in 0..65535
    except ValueError as exc:
        raise DecodeError(f"link target {href!r} is not a URI: {exc}") from exc
    if parts.scheme.lower() != scheme:
        raise DecodeError(f"link target {href!r} is not a {scheme}:// URI")
    if not parts.netloc or parts.hostname is None:
        raise DecodeError(f"link target {href!r} has no host")
    if "@" in parts.netloc:
        raise DecodeError(f"link target {href!r} carries user information")
    if port is None:
        if default_port is None:
            raise DecodeError(f"{scheme} URI {href!r} has no port (it MUST have one)")
        port = default_port
    if port == 0:
        raise DecodeError(f"link target {href!r} has port 0")
    try:
        address = ip_address(parts.hostname)
    except ValueError as exc:
        # Well-formed, but the proxy needs an address to relay to; it resolves no names.
        raise ValidationError(f"link target {href!r} names a host, not an IP address") from exc
    if isinstance(address, IPv6Address) and address.scope_id:
        raise ValidationError(f"link target {href!r} carries a zone id")
    if (address.version == 6) != parts.netloc.startswith("["):
        raise DecodeError(f"link target {href!r}: only IPv6 addresses go in brackets")
    return address, port, parts.path


# ---------------------------------------------------------------------------------------------
# A server's own resources (/.well-known/core over the DTLS session, cBRSKI §6.5, RFC 9148 §5.1)


def format_resource_links(links: Iterable[tuple[str, Params]]) -> str:
    """``</.well-known/brski/rv>;rt=brski.rv;ct=836,...`` from (path, params) pairs; a value
    with a space (``ct="281 287"``) is quoted."""
    return ",".join(_format_link(href, params) for href, params in links)


def matches_query(params: Params, query: Sequence[str]) -> bool:
    """RFC 6690 §4.1 filtering: every ``name=value`` (``value*`` a prefix) must match one of
    the link's values for that name (space-separated values count one by one)."""
    for item in query:
        name, sep, want = item.partition("=")
        if not sep:
            continue
        values = [v for n, value in params if n == name and value is not None
                  for v in value.split(" ")]
        if want.endswith("*"):
            if not any(v.startswith(want[:-1]) for v in values):
                return False
        elif want not in values:
            return False
    return True
