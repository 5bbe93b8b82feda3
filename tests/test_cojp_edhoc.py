"""EDHOC instead of a PSK for CoJP: brski.edhoc_oscore framing, the JRC's responder
(registrar.cojp_edhoc) driven by a lakers initiator, and a pledge_sim join over loopback.

The JRC and the pledge use the RFC 9529 trace-2 static keys and credentials (method 3,
suite 2); the CCS builder reproduces the trace's CRED_I and CRED_R byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from brski import cojp, edhoc_oscore
from brski.errors import DecodeError, ValidationError
from coaps_io.oscore_ephemeral import EphemeralOscoreContext
from pledge_sim import cojp as pledge
from registrar.cojp_config import CojpConfig, load_cojp_config
from registrar.cojp_jrc import CojpJrc
from registrar.cojp_store import CojpStore
from registrar.store import Store
from registrar.tomlconfig import ConfigError, Table

lakers = pytest.importorskip("lakers")

PLEDGE_ID = bytes.fromhex("00124b0014b5d9e4")
NETWORK = b"\xca\xfe"


@pytest.fixture(scope="module")
def trace(vectors: Path) -> dict:
    data = json.loads((vectors / "rfc9529-edhoc" / "rfc9529-traces.json").read_text())
    t = data["sec-trace-2"]

    def value(section: str, prefix: str) -> bytes:
        return bytes.fromhex(next(v for k, v in t[section].items() if k.startswith(prefix)))

    return {
        "sk_r": value("message_2", "SK_R"), "cred_r": value("message_2", "CRED_R"),
        "x_r": value("message_2", "Responder's public authentication key, 'x'"),
        "y_r": value("message_2", "Responder's public authentication key, 'y'"),
        "sk_i": value("message_3", "SK_I"), "cred_i": value("message_3", "CRED_I"),
        "x_i": value("message_3", "Initiator's public authentication key, 'x'"),
        "y_i": value("message_3", "Initiator's public authentication key, 'y'"),
    }


def test_ccs_builder_reproduces_the_trace_credentials(trace: dict) -> None:
    assert edhoc_oscore.ccs("example.edu", b"\x32", trace["x_r"], trace["y_r"]) == \
        trace["cred_r"]
    assert edhoc_oscore.ccs("42-50-31-FF-EF-37-32-39", b"\x2b", trace["x_i"],
                            trace["y_i"]) == trace["cred_i"]


def test_framing_and_identifiers() -> None:
    assert edhoc_oscore.split_message_1(b"\xf5\x03\x02") == b"\x03\x02"
    assert edhoc_oscore.split_message_3(b"\x27\x52\x00") == (b"\x27", b"\x52\x00")
    assert edhoc_oscore.split_message_3(b"\x42\xab\xcd\x41\x00") == (b"\x42\xab\xcd", b"\x41\x00")
    assert edhoc_oscore.oscore_id(b"\x27") == b"\x27"  # RFC 9529: C_R -8 -> Sender ID 27
    assert edhoc_oscore.oscore_id(b"\x42\xab\xcd") == b"\xab\xcd"
    assert edhoc_oscore.connection_id(b"\x37") == b"\x37"
    assert edhoc_oscore.connection_id(b"\xab\xcd") == b"\x42\xab\xcd"
    assert edhoc_oscore.kid_of_id_cred(bytes.fromhex("a104412b")) == b"\x2b"
    assert edhoc_oscore.error_message("no") == b"\x01\x62no"
    for bad in (b"\x03\x02", b"\xf5", b"\xf5" + bytes(2000)):
        with pytest.raises((DecodeError, ValidationError)):
            edhoc_oscore.split_message_1(bad)
    for bad in (b"", b"\x27", b"\x41\x05\x00", b"\x18\x40\x00", b"\x60\x00", b"\x49" + bytes(10),
                b"\x18\x00\x00"):  # int 0 in two bytes: not the one-byte form (fuzzer)
        with pytest.raises((DecodeError, ValidationError)):
            edhoc_oscore.split_message_3(bad)
    for bad in (b"\xa0", b"\xa1\x04\x40", b"\x81\x00"):
        with pytest.raises(ValidationError):
            edhoc_oscore.kid_of_id_cred(bad)


@pytest.fixture
def jrc(trace: dict, tmp_path: Path):
    with Store(tmp_path / "registrar.db", "registrar") as store:
        CojpStore(store).add_pledge(PLEDGE_ID, None, edhoc_kid=b"\x2b",
                                    edhoc_credential=trace["cred_i"])
        config = CojpConfig(enabled=True, edhoc_private_key=trace["sk_r"],
                            edhoc_credential=trace["cred_r"])
        yield CojpJrc(config, store)


def post(payload: bytes, path: tuple[str, ...] = (".well-known", "edhoc")) -> aiocoap.Message:
    message = aiocoap.Message(code=Code.POST, uri_path=path, payload=payload)
    message.mtype, message.mid, message.token = aiocoap.NON, 7, b"\x07"
    return aiocoap.Message.decode(message.encode())


def handshake(jrc: CojpJrc, trace: dict, *, cred_i: bytes | None = None,
              tamper: bool = False) -> tuple[aiocoap.Message, bytes, bytes, object]:
    initiator = lakers.EdhocInitiator()
    c_i = b"\x37"
    answer = jrc.handle(post(b"\xf5" + initiator.prepare_message_1(c_i=c_i)))
    assert answer is not None and answer.code == Code.CHANGED
    c_r, _, _ = initiator.parse_message_2(answer.payload)
    initiator.verify_message_2(trace["sk_i"], lakers.Credential(cred_i or trace["cred_i"]),
                               lakers.Credential(trace["cred_r"]))
    message_3, _ = initiator.prepare_message_3(lakers.CredentialTransfer.ByReference)
    if tamper:
        message_3 = message_3[:-1] + bytes([message_3[-1] ^ 1])
    return jrc.handle(post(bytes(c_r) + message_3)), c_i, bytes(c_r), initiator


def test_edhoc_then_join(jrc: CojpJrc, trace: dict) -> None:
    answer, c_i, c_r, initiator = handshake(jrc, trace)
    assert answer.code == Code.CHANGED and answer.payload == b""
    initiator.completed_without_message_4()
    ctx = EphemeralOscoreContext(
        edhoc_oscore.oscore_id(c_r), edhoc_oscore.oscore_id(c_i),
        bytes(initiator.edhoc_exporter(0, b"", 16)), bytes(initiator.edhoc_exporter(1, b"", 8)))
    inner = aiocoap.Message(code=Code.POST, uri_path=("j",),
                            payload=cojp.JoinRequest(NETWORK).encode())
    outer, request_id = ctx.protect(inner)
    outer.mtype, outer.mid, outer.token = aiocoap.NON, 9, b"\x09"
    wire = outer.encode()
    assert b"\x00\x12\x4b" not in wire  # no ID context: the pledge ID is not on the wire
    response = jrc.handle(aiocoap.Message.decode(wire))
    assert response is not None
    response.mtype, response.mid, response.token = aiocoap.NON, 10, b"\x09"
    plain, _ = ctx.unprotect(aiocoap.Message.decode(response.encode()), request_id)
    conf = cojp.decode_configuration(plain.payload)
    assert conf.short_identifier == cojp.ShortIdentifier(b"\x00\x01")
    # The same request again (lost response): the same answer; an older one: a replay.
    again = jrc.handle(aiocoap.Message.decode(wire))
    assert again is not None and again.payload == response.payload
    assert jrc.counts["retransmission"] == 1 and jrc.counts["edhoc-completed"] == 1
    assert CojpStore(jrc.pledges.store).pledge(PLEDGE_ID).joins == 1


def test_edhoc_refusals(jrc: CojpJrc, trace: dict) -> None:
    # A pledge whose credential is not in the store: error, counted.
    other = trace["cred_i"].replace(b"\x41\x2b", b"\x41\x2c")  # another kid, same key
    answer, *_ = handshake(jrc, trace, cred_i=other)
    assert answer.code == Code.BAD_REQUEST and answer.payload.startswith(b"\x01")
    assert jrc.counts["edhoc-unknown-credential"] == 1
    answer, *_ = handshake(jrc, trace, tamper=True)
    assert answer.code == Code.BAD_REQUEST and jrc.counts["edhoc-failed"] == 1
    answer = jrc.handle(post(b"\x42\x00\x00\x52" + bytes(18)))
    assert answer.code == Code.BAD_REQUEST and jrc.counts["edhoc-unknown-session"] == 1
    answer = jrc.handle(post(b"\xf5\x03\x06"))  # suite 6 only / truncated
    assert answer.code == Code.BAD_REQUEST and jrc.counts["edhoc-failed"] == 2
    # An OSCORE request naming no EDHOC session: dropped, counted.
    ctx = EphemeralOscoreContext(b"\x01\x02", b"\x37", bytes(16), bytes(8))
    outer, _ = ctx.protect(aiocoap.Message(code=Code.POST, uri_path=("j",), payload=b"\xa0"))
    outer.mtype, outer.mid, outer.token = aiocoap.NON, 11, b"\x0b"
    assert jrc.handle(aiocoap.Message.decode(outer.encode())) is None
    assert jrc.counts["unknown-id-context"] == 1


def test_edhoc_is_off_without_keys(tmp_path: Path) -> None:
    with Store(tmp_path / "r.db", "registrar") as store:
        jrc = CojpJrc(CojpConfig(enabled=True), store)
        assert jrc.handle(post(b"\xf5\x03")) is None and jrc.counts["not-oscore"] == 1


def test_config_checks_the_key_against_the_credential(trace: dict, tmp_path: Path) -> None:
    (tmp_path / "k").write_text(trace["sk_r"].hex())
    (tmp_path / "c").write_text(trace["cred_r"].hex())
    (tmp_path / "ci").write_text(trace["cred_i"].hex())

    def load(text: str) -> CojpConfig:
        import tomllib
        return load_cojp_config(Table(tomllib.loads(text), "", tmp_path))

    conf = load('[cojp]\nedhoc_private_key = "k"\nedhoc_credential = "c"\n')
    assert conf.edhoc_private_key == trace["sk_r"]
    with pytest.raises(ConfigError, match="does not match"):
        load('[cojp]\nedhoc_private_key = "k"\nedhoc_credential = "ci"\n')
    with pytest.raises(ConfigError, match="edhoc_credential: missing"):
        load('[cojp]\nedhoc_private_key = "k"\n')


def test_pledge_sim_edhoc_join_over_loopback(trace: dict, tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    with Store(tmp_path / "registrar.db", "registrar") as store:
        CojpStore(store).add_pledge(PLEDGE_ID, None, edhoc_kid=b"\x2b",
                                    edhoc_credential=trace["cred_i"])
        config = CojpConfig(enabled=True, listen=("::1", port), edhoc_private_key=trace["sk_r"],
                            edhoc_credential=trace["cred_r"])

        async def run() -> pledge.JoinResult:
            jrc = CojpJrc(config, store)
            await jrc.start()
            client = await aiocoap.Context.create_client_context(transports=["udp6"])
            try:
                ctx = await pledge.edhoc_context(client, f"[::1]:{port}", trace["sk_i"],
                                                 trace["cred_i"], trace["cred_r"], timeout=10)
                return await pledge.join(client, ctx, f"[::1]:{port}", NETWORK, timeout=10)
            finally:
                await client.shutdown()
                await jrc.stop()

        result = asyncio.run(run())
        assert result.configuration.short_identifier.identifier == b"\x00\x01"
        assert CojpStore(store).pledge(PLEDGE_ID).joins == 1
