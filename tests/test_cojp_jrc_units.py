"""The CoJP JRC's decisions (registrar.cojp_jrc) fed protected CoAP messages, no sockets.

The pledge side is aiocoap's own FilesystemSecurityContext (pledge_sim.cojp): an independent
OSCORE peer of the JRC's store-backed context. Covers a join, the retransmission of a Join
Request whose response was lost (answered from the cache, byte-identical), replays, a bad tag,
an unknown ID context, strict Join_Request parsing (4.00 with Unsupported_Configuration), the
network check, and a restart without shutdown (``kill -9``): counters come back from the store,
a replay stays refused and the JRC's sequence numbers never repeat.
"""

from __future__ import annotations

from pathlib import Path

import aiocoap
import pytest
from aiocoap import oscore
from aiocoap.numbers.codes import Code

from brski import cojp
from pledge_sim import cojp as pledge
from registrar.cojp_config import CojpConfig
from registrar.cojp_jrc import CojpJrc
from registrar.cojp_store import SSN_STEP, CojpStore, CojpStoreError
from registrar.store import Store

PLEDGE_ID = bytes.fromhex("00124b0014b5d9e2")
PSK = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
NETWORK = b"\xca\xfe"
KEY = bytes.fromhex("e6bf4287c2d7618d6a9687445ffd33e6")
CONFIG = CojpConfig(enabled=True, network_id=NETWORK, jrc_address=bytes(15) + b"\x01",
                    short_id_lease=24, join_rate=50,
                    link_layer_keys=(cojp.LinkLayerKey(1, KEY),))


class Pledge:
    def __init__(self, tmp: Path, pledge_id: bytes = PLEDGE_ID, psk: bytes = PSK) -> None:
        directory = tmp / f"pledge-{pledge_id.hex()}"
        pledge.write_context(directory, pledge_id, psk)
        self.ctx = pledge.load_context(directory)

    def request(self, payload: bytes | None = None, path: tuple[str, ...] = ("j",),
                code: Code = Code.POST) -> tuple[bytes, oscore.RequestIdentifiers]:
        inner = aiocoap.Message(code=code, uri_path=path,
                                payload=cojp.JoinRequest(NETWORK).encode()
                                if payload is None else payload)
        outer, request_id = self.ctx.protect(inner)
        outer.mtype, outer.mid, outer.token = aiocoap.NON, 1, b"\x01"
        return outer.encode(), request_id

    def open(self, response: aiocoap.Message, request_id: oscore.RequestIdentifiers
             ) -> aiocoap.Message:
        response.mtype, response.mid, response.token = aiocoap.NON, 2, b"\x01"
        wire = aiocoap.Message.decode(response.encode())
        plain, _ = self.ctx.unprotect(wire, request_id)
        return plain


def incoming(wire: bytes, mid: int = 1) -> aiocoap.Message:
    message = aiocoap.Message.decode(wire)
    message.mid = mid  # a stateless join proxy forwards each copy as a new NON message
    return message


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "registrar.db", "registrar") as s:
        CojpStore(s).add_pledge(PLEDGE_ID, PSK)
        yield s


def test_join_returns_the_configuration(store: Store, tmp_path: Path) -> None:
    jrc = CojpJrc(CONFIG, store)
    p = Pledge(tmp_path)
    wire, rid = p.request()
    response = jrc.handle(incoming(wire))
    assert response is not None and response.code == Code.CHANGED
    plain = p.open(response, rid)
    assert plain.code == Code.CHANGED
    conf = cojp.decode_configuration(plain.payload)
    assert conf == cojp.Configuration(
        link_layer_keys=(cojp.LinkLayerKey(1, KEY),),
        short_identifier=cojp.ShortIdentifier(b"\x00\x01", 24),
        jrc_address=bytes(15) + b"\x01", join_rate=50)
    record = CojpStore(store).pledge(PLEDGE_ID)
    assert record is not None and record.joins == 1
    assert [e.event for e in store.audit_events(PLEDGE_ID.hex())][-1] == "cojp-join"
    # The JRC protected the response with a Partial IV of its own (response_partial_iv).
    assert pledge.response_partial_iv(response) == b"\x00"


def test_retransmitted_request_gets_the_same_response(store: Store, tmp_path: Path) -> None:
    jrc = CojpJrc(CONFIG, store)
    p = Pledge(tmp_path)
    wire, rid = p.request()
    first = jrc.handle(incoming(wire, 1))
    again = jrc.handle(incoming(wire, 2))  # the first response was lost
    assert first is not None and again is not None
    assert (again.code, again.opt.oscore, again.payload) == \
        (first.code, first.opt.oscore, first.payload)
    assert jrc.counts["retransmission"] == 1 and jrc.counts["replay"] == 0
    assert p.open(again, rid).code == Code.CHANGED
    assert CojpStore(store).pledge(PLEDGE_ID).joins == 1  # one join, not two


def test_replayed_older_request_is_dropped_and_counted(store: Store, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    jrc = CojpJrc(CONFIG, store)
    p = Pledge(tmp_path)
    old, _ = p.request()
    new, _ = p.request()
    assert jrc.handle(incoming(old)) is not None
    assert jrc.handle(incoming(new)) is not None
    # The old request is not the cached one any more: a replay, silently dropped (§7.3.2).
    assert jrc.handle(incoming(old)) is None
    assert jrc.counts["replay"] == 1
    assert sum("refused (replay)" in r.getMessage() for r in caplog.records) == 1


def test_bad_tag_unknown_context_and_unprotected_are_dropped(store: Store, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    jrc = CojpJrc(CONFIG, store)
    wire, _ = Pledge(tmp_path).request()
    tampered = wire[:-1] + bytes([wire[-1] ^ 1])
    assert jrc.handle(incoming(tampered)) is None
    stranger, _ = Pledge(tmp_path, pledge_id=b"\x99" * 8).request()
    assert jrc.handle(incoming(stranger)) is None
    wrong_key, _ = Pledge(tmp_path / "other", psk=b"\x55" * 16).request()
    assert jrc.handle(incoming(wrong_key)) is None
    plain = aiocoap.Message(code=Code.POST, uri_path=("j",),
                            payload=cojp.JoinRequest(NETWORK).encode())
    plain.mtype, plain.mid = aiocoap.NON, 3
    assert jrc.handle(incoming(plain.encode())) is None
    assert (jrc.counts["bad-tag"], jrc.counts["unknown-id-context"],
            jrc.counts["not-oscore"]) == (2, 1, 1)
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 4 and "pledge 9999999999999999 is not in the store" in lines[1]
    # A genuine request still passes after the forgeries: they did not move the window.
    good, _ = Pledge(tmp_path / "third").request()
    assert jrc.handle(incoming(good)) is not None


def test_malformed_join_request_gets_a_diagnostic(store: Store, tmp_path: Path) -> None:
    jrc = CojpJrc(CONFIG, store)
    p = Pledge(tmp_path)
    wire, rid = p.request(payload=bytes.fromhex("a2010205422222"))  # role 2: not registered
    plain = p.open(jrc.handle(incoming(wire)), rid)
    assert plain.code == Code.BAD_REQUEST
    (entry,) = cojp.decode_unsupported_configuration(plain.payload)
    assert (entry.code, entry.label) == (cojp.UnsupportedCode.MALFORMED, cojp.Label.ROLE)
    wire, rid = p.request(payload=cojp.JoinRequest(b"\xbe\xef").encode())
    plain = p.open(jrc.handle(incoming(wire)), rid)
    (entry,) = cojp.decode_unsupported_configuration(plain.payload)
    assert (entry.code, entry.label) == (cojp.UnsupportedCode.UNSUPPORTED,
                                         cojp.Label.NETWORK_IDENTIFIER)
    wire, rid = p.request(path=("k",))
    assert p.open(jrc.handle(incoming(wire)), rid).code == Code.NOT_FOUND
    assert jrc.counts["malformed-join-request"] == 1 and jrc.counts["wrong-network"] == 1
    assert CojpStore(store).pledge(PLEDGE_ID).joins == 0


def test_blacklisted_pledge_is_refused(store: Store, tmp_path: Path) -> None:
    config = CojpConfig(enabled=True, blacklist=(PLEDGE_ID,))
    jrc = CojpJrc(config, store)
    wire, _ = Pledge(tmp_path).request()
    assert jrc.handle(incoming(wire)) is None and jrc.counts["blacklisted"] == 1


def test_state_survives_a_restart_without_shutdown(store: Store, tmp_path: Path) -> None:
    p = Pledge(tmp_path)
    jrc = CojpJrc(CONFIG, store)
    wires, pivs = [], []
    for _ in range(3):
        wire, rid = p.request()
        response = jrc.handle(incoming(wire))
        wires.append(wire)
        pivs.append(pledge.response_partial_iv(response))
    # kill -9: no stop(), a new JRC on the same store file.
    jrc = CojpJrc(CONFIG, store)
    assert jrc.handle(incoming(wires[0])) is None and jrc.counts["replay"] == 1
    assert jrc.handle(incoming(wires[-1])) is not None  # the cached one, resent as it was
    for _ in range(2):
        wire, rid = p.request()
        response = jrc.handle(incoming(wire))
        assert p.open(response, rid).code == Code.CHANGED
        pivs.append(pledge.response_partial_iv(response))
    numbers = [int.from_bytes(piv, "big") for piv in pivs]
    assert numbers[:3] == [0, 1, 2]
    assert numbers[3] >= SSN_STEP and len(set(numbers)) == len(numbers)


def test_sequence_number_is_reserved_before_use(store: Store, tmp_path: Path) -> None:
    jrc = CojpJrc(CONFIG, store)
    wire, _ = Pledge(tmp_path).request()
    jrc.handle(incoming(wire))
    assert CojpStore(store).pledge(PLEDGE_ID).ssn_reserved > 0
    window = CojpStore(store).pledge(PLEDGE_ID)
    assert (window.window_index, window.window_bits) == (0, 1)


def test_store_refuses_duplicates_and_reused_psks(store: Store) -> None:
    pledges = CojpStore(store)
    with pytest.raises(CojpStoreError, match="already known"):
        pledges.add_pledge(PLEDGE_ID, b"\x01" * 16)
    with pytest.raises(CojpStoreError, match="must differ"):
        pledges.add_pledge(PLEDGE_ID, PSK, replace=True)
    replaced = pledges.add_pledge(PLEDGE_ID, b"\x01" * 16, replace=True)
    assert replaced.short_id == 1 and replaced.ssn_reserved == 0
    assert pledges.add_pledge(b"\x02" * 8, b"\x02" * 16).short_id == 2


def test_join_all_twice_in_one_process(store: Store, tmp_path: Path) -> None:
    """pledge_sim.cojp.join_all over loopback: a second run in the same process loads the
    pledges' OSCORE contexts again (their locks were released) and counts on from the first."""
    import asyncio
    import socket

    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    config = CojpConfig(enabled=True, listen=("::1", port))

    async def run() -> list[list[pledge.PledgeOutcome]]:
        jrc = CojpJrc(config, store)
        await jrc.start()
        try:
            return [await pledge.join_all([(PLEDGE_ID, PSK)], tmp_path / "state",
                                          f"[::1]:{port}", NETWORK, via_proxy=False,
                                          concurrency=1, timeout=10) for _ in range(2)]
        finally:
            await jrc.stop()

    first, second = asyncio.run(run())
    assert first[0].ok and second[0].ok, (first[0].reason, second[0].reason)
    assert second[0].result.request_piv > first[0].result.request_piv


def test_pledge_via_proxy_sends_the_rfc_9031_outer_options(tmp_path: Path) -> None:
    """What a CoJP join proxy receives from ``pledge-sim cojp --via-proxy``: POST, CON,
    Proxy-Scheme "coap", Uri-Host "6tisch.arpa", OSCORE with the pledge ID as kid context, and
    no Uri-Path outside (it is Class E, inside the ciphertext) (RFC 9031 §8.1)."""
    import asyncio
    import socket

    listener = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    listener.bind(("::1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    p = Pledge(tmp_path)

    async def run() -> bytes:
        client = await aiocoap.Context.create_client_context(transports=["udp6"])
        loop = asyncio.get_running_loop()
        try:
            joining = asyncio.ensure_future(pledge.join(client, p.ctx, f"[::1]:{port}", NETWORK,
                                                        via_proxy=True, timeout=2))
            datagram = await asyncio.wait_for(loop.sock_recv(listener, 2048), 5)
            with pytest.raises(pledge.JoinFailed, match="no response"):
                await joining
            return datagram
        finally:
            await client.shutdown()

    try:
        wire = asyncio.run(run())
    finally:
        listener.close()
    request = aiocoap.Message.decode(wire)
    assert request.code == Code.POST and request.mtype == aiocoap.CON
    assert request.opt.proxy_scheme == "coap" and request.opt.uri_host == "6tisch.arpa"
    assert request.opt.uri_path == () and request.opt.uri_port is None
    assert oscore.verify_start(request)[oscore.COSE_KID_CONTEXT] == PLEDGE_ID
