"""CoRE discovery of a join proxy (or a registrar on the pledge's link) for a CoAPS pledge.

cBRSKI §10: the pledge multicasts ``GET coap://[ff02::fd]/.well-known/core?brski-jp=*`` (NON)
on each of its links; an answer ``<>;brski-jp=PORT`` names a DTLS port on the answer's source
address (``constrained.join_proxies``). A registrar on the link answers the same way. Pledges
built on older drafts ask ``?rt=brski.jp`` instead and get ``<coaps://[ADDR]:PORT>;rt=brski.jp``
(``QUERIES["rt"]``, pledge-sim's ``--core-query rt``). Every answer within the time is kept
(RFC 8995 §4.1: try them all), deduplicated, in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct

import aiocoap

from brski.errors import DecodeError

from .coaps_options import QUERIES as QUERIES  # re-exported: the tests and callers name it here
from .coaps_options import QUERY
from .constrained import join_proxies
from .discovery import Candidate, DiscoveryError

log = logging.getLogger(__name__)

COAP_PORT = 5683
ALL_COAP_NODES = "ff02::fd"
GRACE = 0.5  # after the first answer, listen this much longer for more (multicast Leisure)


def _interfaces() -> list[tuple[int, str]]:
    return [(i, name) for i, name in socket.if_nameindex() if name != "lo"]


def request_datagram(message_id: int, token: bytes, query: str = QUERY) -> bytes:
    # Sent on a raw socket, so that every answer (one per proxy) is seen, which aiocoap's
    # request API does not give; aiocoap still encodes and decodes the messages.
    msg = aiocoap.Message(code=aiocoap.GET, uri_path=(".well-known", "core"),
                          uri_query=(query,))
    msg.mtype, msg.mid, msg.token = aiocoap.NON, message_id, token
    return msg.encode()


def candidates_from_answer(data: bytes, source: str, ifname: str | None,
                           token: bytes) -> list[Candidate]:
    """The join ports one answer names; [] for anything that is not our request's 2.05."""
    try:
        msg = aiocoap.Message.decode(data)
    except Exception:  # aiocoap raises several types for undecodable datagrams
        return []
    if msg.token != token or msg.code != aiocoap.CONTENT:
        return []
    host = source.split("%", 1)[0]
    if ifname and host.lower().startswith("fe80:"):
        host = f"{host}%{ifname}"
    try:
        return [Candidate(h, p, "coap") for h, p in join_proxies(msg.payload, host)]
    except DecodeError:
        return []


async def discover_join_proxies(timeout: float, query: str = QUERY) -> list[Candidate]:
    """Ask on every link; the candidates found within ``timeout`` (DiscoveryError if none)."""
    loop = asyncio.get_running_loop()
    links = _interfaces()
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setblocking(False)
    found: list[Candidate] = []
    try:
        sock.bind(("::", 0))
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
        token = os.urandom(4)
        names = {index: name for index, name in links}
        for n, (index, name) in enumerate(links):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF,
                            struct.pack("@I", index))
            try:
                sock.sendto(request_datagram(int.from_bytes(token[:2]) + n & 0xFFFF, token,
                                             query), (ALL_COAP_NODES, COAP_PORT, 0, index))
            except OSError as exc:  # a link without IPv6 or down: the others may do
                log.debug("CoRE discovery on %s: %s", name, exc)
        end = loop.time() + timeout
        while loop.time() < end:
            try:
                data, addr = await asyncio.wait_for(loop.sock_recvfrom(sock, 2048),
                                                    end - loop.time())
            except TimeoutError:
                break
            ifname = names.get(addr[3]) if len(addr) > 3 else None
            for candidate in candidates_from_answer(data, addr[0], ifname, token):
                if candidate not in found:
                    log.info("CoRE discovery: %s from %s", candidate.label, addr[0])
                    found.append(candidate)
            if found:
                end = min(end, loop.time() + GRACE)
    finally:
        sock.close()
    if not found:
        raise DiscoveryError(f"no join proxy or registrar answered CoRE discovery "
                             f"(?{query} on ff02::fd) within {timeout:g} s "
                             "(or give --registrar ADDR)")
    return found
