"""The cojp relay's two paths without sockets: what it forwards and what it answers, a JRC's
confirmable (separate) response, a RST from a JRC without extended tokens, key rotation and
the token lifetime. The namespace tests (test_cojp_relay.py) run the same through the daemon."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fuzzkit import fuzz_settings, mutated
from hypothesis import given
from hypothesis import strategies as st

from brski.coap_datagram import CoapDatagram, MessageType
from joinproxyd.config import CojpSettings, Limits
from joinproxyd.metrics import Metrics
from joinproxyd.model import JoinInterface, RegistrarEndpoint
from joinproxyd.relays import cojp
from joinproxyd.relays.base import RelayContext
from joinproxyd.relays.cojp import CojpMode, _PledgeSide

JRC = RegistrarEndpoint(10, "fd4a:5044::100", 8443, cojp_port=5683)
FROM_JRC = ("fd4a:5044::100", 5683, 0, 0)
IFACE = JoinInterface("join0", 7, "fe80::1", (), ("cojp",), 5683)
PLEDGE = ("fe80::1:2", 40000, 0, 7)
JOIN = ((3, b"6tisch.arpa"), (9, b"\x09\x00pledge"), (39, b"coap"))


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))


def make_mode(settings: CojpSettings | None = None
              ) -> tuple[CojpMode, _PledgeSide, Recorder, Recorder, Metrics]:
    metrics = Metrics()
    mode = CojpMode(RelayContext(metrics, Limits, lambda: None, logging.getLogger("test.cojp"),
                                 cojp=lambda: settings or CojpSettings()))
    mode.registrar = JRC
    mode._registrar_source = (JRC.address, 5683)
    pledge_link, upstream = Recorder(), Recorder()
    side = _PledgeSide(mode, IFACE, pledge_link)  # type: ignore[arg-type]  # records sendto
    side.transport = pledge_link  # type: ignore[assignment]
    mode.joins[IFACE.name] = side
    mode.by_index[IFACE.index] = side
    mode.upstream = upstream  # type: ignore[assignment]
    return mode, side, pledge_link, upstream, metrics


def drops(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value(
        "joinproxyd_drops_total", {"mode": "cojp", "reason": reason}) or 0.0


def request(mtype: MessageType = MessageType.CON, token: bytes = b"\x08",
            options: tuple[tuple[int, bytes], ...] = JOIN) -> bytes:
    return CoapDatagram(mtype, 2, 0x4242, token, options, b"oscore").encode()


def test_forwarded_as_non_and_answered_with_a_piggybacked_ack() -> None:
    mode, side, pledge_link, upstream, _ = make_mode()
    mode.from_pledge(side, request(), PLEDGE)
    (data, where), = upstream.sent
    assert where == ("fd4a:5044::100", 5683, 0, 0)
    forwarded = CoapDatagram.decode(data)
    assert forwarded.mtype is MessageType.NON and forwarded.code == 2
    assert forwarded.options == ((9, b"\x09\x00pledge"),) and forwarded.payload == b"oscore"
    assert len(forwarded.token) == 38 + 1
    # A separate CON response from the JRC: acknowledged (empty ACK, its ID), then relayed.
    mode.from_registrar(CoapDatagram(MessageType.CON, 0x44, 0x777, forwarded.token,
                                     ((9, b""),), b"cfg").encode(), FROM_JRC)
    assert upstream.sent[1] == (CoapDatagram(MessageType.ACK, 0, 0x777).encode(), FROM_JRC)
    (answer, to), = pledge_link.sent
    assert to == PLEDGE
    assert CoapDatagram.decode(answer) == CoapDatagram(MessageType.ACK, 0x44, 0x4242, b"\x08",
                                                       ((9, b""),), b"cfg")


def test_uri_host_without_proxy_scheme_is_relayed_too() -> None:
    """aiocoap-client --proxy leaves Proxy-Scheme out when the scheme is the proxy's own."""
    mode, side, _, upstream, metrics = make_mode()
    mode.from_pledge(side, request(options=JOIN[:2]), PLEDGE)
    (data, _), = upstream.sent
    assert CoapDatagram.decode(data).options == ((9, b"\x09\x00pledge"),)
    mode.from_pledge(side, request(options=((3, b"example.org"), JOIN[1])), PLEDGE)
    mode.from_pledge(side, request(options=(JOIN[1],)), PLEDGE)  # no host at all
    assert len(upstream.sent) == 1 and drops(metrics, "irrelevant") == 2


def test_what_is_refused_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    mode, side, pledge_link, upstream, metrics = make_mode()
    mode.from_pledge(side, request(options=((3, b"6tisch.arpa"), (39, b"http"))), PLEDGE)
    mode.from_pledge(side, request(options=(*JOIN, (35, b"coap://x/"))), PLEDGE)
    mode.from_pledge(side, CoapDatagram(MessageType.CON, 0x44, 1, b"", JOIN).encode(), PLEDGE)
    assert drops(metrics, "irrelevant") == 3
    mode.from_pledge(side, request(token=bytes(9)), PLEDGE)
    mode.from_pledge(side, b"\x40", PLEDGE)
    assert drops(metrics, "malformed") == 2
    mode.from_pledge(side, request(), ("fe80::1:2", 40000, 0, 7))
    token = CoapDatagram.decode(upstream.sent[0][0]).token
    for _ in range(2):  # no RFC 8974 at the JRC: counted each time, said once
        mode.from_registrar(CoapDatagram(MessageType.RST, 0, 5).encode(), FROM_JRC)
    assert drops(metrics, "irrelevant") == 5
    assert [r.levelname for r in caplog.records if "RFC 8974" in r.getMessage()] == ["WARNING"]
    mode.from_registrar(CoapDatagram(MessageType.NON, 0x44, 5, token).encode(),
                        ("fd4a:5044::101", 5683, 0, 0))
    assert drops(metrics, "unsolicited") == 1
    assert pledge_link.sent == []


def test_rotation_and_lifetime(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(cojp.time, "monotonic", lambda: now[0])
    mode, side, pledge_link, upstream, metrics = make_mode()
    mode.from_pledge(side, request(MessageType.NON), PLEDGE)
    first = CoapDatagram.decode(upstream.sent[-1][0]).token
    mode.rotate_key()
    mode.from_registrar(CoapDatagram(MessageType.NON, 0x44, 1, first).encode(), FROM_JRC)
    assert len(pledge_link.sent) == 1  # the previous key still opens
    mode.rotate_key()
    mode.from_registrar(CoapDatagram(MessageType.NON, 0x44, 2, first).encode(), FROM_JRC)
    assert drops(metrics, "cojp-stale") == 1
    mode.from_pledge(side, request(MessageType.NON), PLEDGE)
    late = CoapDatagram.decode(upstream.sent[-1][0]).token
    now[0] += cojp.TOKEN_LIFETIME + 2
    mode.from_registrar(CoapDatagram(MessageType.NON, 0x44, 3, late).encode(), FROM_JRC)
    assert drops(metrics, "cojp-stale") == 2 and len(pledge_link.sent) == 1


def test_too_big_once_the_token_is_sealed() -> None:
    mode, side, _, upstream, metrics = make_mode()
    fits = CoapDatagram(MessageType.CON, 2, 1, b"", JOIN, bytes(1100)).encode()
    mode.from_pledge(side, fits, PLEDGE)
    assert len(upstream.sent) == 1 and len(upstream.sent[0][0]) <= cojp.MAX_FORWARDED
    grown = CoapDatagram(MessageType.CON, 2, 1, b"", JOIN, bytes(1190)).encode()
    assert len(grown) <= cojp.MAX_FORWARDED  # it fitted as the pledge sent it
    mode.from_pledge(side, grown, PLEDGE)
    assert len(upstream.sent) == 1 and drops(metrics, "too-big") == 1


def test_join_rate_zero_forwards_nothing() -> None:
    mode, side, _, upstream, metrics = make_mode(CojpSettings(rate=0, burst=1))
    for _ in range(3):
        mode.from_pledge(side, request(), PLEDGE)
    assert upstream.sent == []  # not even the burst: RFC 9031 join rate 0 = no join traffic
    assert drops(metrics, "rate-limit") == 3


@fuzz_settings(300)
@given(st.one_of(st.binary(max_size=120), mutated([request(), request(MessageType.NON,
                                                                       bytes(8))])),
       st.binary(min_size=38, max_size=46))
def test_a_datagram_never_raises(data: bytes, token: bytes) -> None:
    """A daemon never dies on a packet: any bytes from a pledge or from the JRC's port are
    relayed or dropped and counted, nothing else."""
    mode, side, _, _, metrics = make_mode(CojpSettings(rate=1e6, burst=10**6))
    mode.from_pledge(side, data, PLEDGE)
    mode.from_registrar(data, FROM_JRC)
    mode.from_registrar(data[:4] + token + data[4:], FROM_JRC)
    total = sum(sample.value for family in metrics.registry.collect()
                if family.name == "joinproxyd_drops" for sample in family.samples
                if sample.name == "joinproxyd_drops_total")
    relayed = mode.datagrams["upstream"] + mode.datagrams["downstream"]
    assert total + relayed == 3  # each one either relayed or dropped and counted


def test_refusals_logged_once_per_sender_and_reason_with_journal_fields(
        caplog: pytest.LogCaptureFixture) -> None:
    """Every refusal is counted; the journal hears of it once per (sender, reason), at info,
    with the fields MODE, REASON, INTERFACE and PLEDGE (REGISTRAR for the JRC's side)."""
    caplog.set_level(logging.INFO, logger="test.cojp")
    mode, side, _, upstream, metrics = make_mode()
    for _ in range(3):
        mode.from_pledge(side, b"\x40", PLEDGE)
    mode.from_pledge(side, request(), PLEDGE)
    token = bytearray(CoapDatagram.decode(upstream.sent[0][0]).token)
    token[-1] ^= 1  # its tag no longer authenticates
    for mid in range(3):
        mode.from_registrar(CoapDatagram(MessageType.NON, 0x44, mid, bytes(token)).encode(),
                            FROM_JRC)
    assert drops(metrics, "malformed") == 3 and drops(metrics, "cojp-forged") == 3
    said = [r for r in caplog.records if r.getMessage().startswith("cojp dropped")]
    assert [(r.levelname, r.REASON) for r in said] == [  # type: ignore[attr-defined]
        ("INFO", "malformed"), ("INFO", "cojp-forged")]
    pledge_record, jrc_record = said
    assert pledge_record.PLEDGE == "fe80::1:2%join0"  # type: ignore[attr-defined]
    assert pledge_record.INTERFACE == "join0" and pledge_record.MODE == "cojp"  # type: ignore[attr-defined]
    assert jrc_record.REGISTRAR == "[fd4a:5044::100]:5683"  # type: ignore[attr-defined]
    assert not hasattr(jrc_record, "PLEDGE")


def test_socket_errors_are_counted_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    """An ICMPv6 error on either socket (a pledge gone, the JRC's port closed) is a lost
    datagram: counted by reason and logged, as jpy does (the shared stateless base)."""
    caplog.set_level(logging.INFO, logger="test.cojp")
    mode, side, _, _, metrics = make_mode()
    for _ in range(3):
        side.error_received(ConnectionRefusedError(111, "Connection refused"))
        mode.registrar_socket_error(ConnectionRefusedError(111, "Connection refused"))
    assert drops(metrics, "send-error") == 3 and drops(metrics, "registrar-unreachable") == 3
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cojp dropped")]
    assert len(said) == 2, said  # once per reason and sender while it lasts
    assert any("reply to a pledge on join0 not delivered" in line for line in said), said
    assert any("sent to [fd4a:5044::100]:5683 was refused" in line for line in said), said
