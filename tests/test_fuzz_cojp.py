"""Fuzz harnesses for the CoJP/EDHOC decoders and the JRC's request handler (fuzzkit: short and
derandomized in ``make test``, long with ``make fuzz``'s BRSKI_FUZZ_EXAMPLES).

Contract: decoders raise only ProtocolError subclasses and what they accept re-encodes to an
equal object; the JRC answers or drops any datagram without raising, and a mutated protected
request is never accepted as a join (the AEAD tag covers it)."""

from __future__ import annotations

from pathlib import Path

import aiocoap
import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from brski import cojp, edhoc_oscore
from pledge_sim import cojp as pledge
from registrar.cojp_config import CojpConfig
from registrar.cojp_jrc import CojpJrc
from registrar.cojp_store import CojpStore
from registrar.store import Store
from tests.fuzzkit import decoded_or_none, fuzz_settings, mutated

fuzz = fuzz_settings(200)
KEY = bytes.fromhex("e6bf4287c2d7618d6a9687445ffd33e6")
SEEDS = {
    "join-request": [bytes.fromhex("a10542cafe"), cojp.JoinRequest(
        b"\x12\x34", role=1, unsupported=(cojp.UnsupportedParameter(1, 3, None),)).encode()],
    "configuration": [bytes.fromhex("a202820150e6bf4287c2d7618d6a9687445ffd33e6038142af93"),
                      cojp.Configuration(
                          link_layer_keys=(cojp.LinkLayerKey(1, KEY, 2, b"\x01\x02"),),
                          short_identifier=cojp.ShortIdentifier(b"\x00\x07", 5),
                          jrc_address=bytes(16), blacklist=(b"\x01" * 8,),
                          join_rate=9).encode()],
    "unsupported": [bytes.fromhex("830007f6"), bytes.fromhex("8601030000050a")],
    "edhoc-message-3": [b"\x27\x52" + bytes(18), b"\x42\xab\xcd\x52" + bytes(18)],
    "edhoc-id-cred": [bytes.fromhex("a104412b"), bytes.fromhex("a10418")],
}


def _join_request(data: bytes) -> None:
    value = decoded_or_none(cojp.decode_join_request, data)
    if value is not None:
        assert cojp.decode_join_request(value.encode()) == value


def _configuration(data: bytes) -> None:
    value = decoded_or_none(cojp.decode_configuration, data)
    if value is not None:
        assert cojp.decode_configuration(value.encode()) == value


def _unsupported(data: bytes) -> None:
    value = decoded_or_none(cojp.decode_unsupported_configuration, data)
    if value is not None:
        assert cojp.decode_unsupported_configuration(
            cojp.encode_unsupported_configuration(value)) == value


def _message_3(data: bytes) -> None:
    value = decoded_or_none(edhoc_oscore.split_message_3, data)
    if value is not None:
        c_r, rest = value
        assert c_r + rest == data and edhoc_oscore.connection_id(
            edhoc_oscore.oscore_id(c_r)) == c_r


def _id_cred(data: bytes) -> None:
    decoded_or_none(edhoc_oscore.kid_of_id_cred, data)


CHECKS = {"join-request": _join_request, "configuration": _configuration,
          "unsupported": _unsupported, "edhoc-message-3": _message_3,
          "edhoc-id-cred": _id_cred}


@pytest.mark.parametrize("name", list(CHECKS))
@fuzz
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes(name: str, data: bytes) -> None:
    CHECKS[name](data)


@pytest.mark.parametrize("name", list(CHECKS))
@fuzz
@given(data=st.data())
def test_mutated_encodings(name: str, data: st.DataObject) -> None:
    for seed in SEEDS[name]:
        CHECKS[name](seed)
    CHECKS[name](data.draw(mutated(SEEDS[name])))


@pytest.mark.parametrize("body", [{1: 0, 5: b"\xca\xfe", 8: [0, 1, {"x": [1.5, None]}]}])
def test_addinfo_may_be_any_value(body: dict) -> None:
    value = cojp.decode_join_request(cbor2.dumps(body))
    assert value.unsupported[0].addinfo == {"x": [1.5, None]}


@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory):
    tmp: Path = tmp_path_factory.mktemp("jrc")
    store = Store(tmp / "registrar.db", "registrar")
    pledge_id, psk = b"\x01" * 8, b"\x02" * 16
    CojpStore(store).add_pledge(pledge_id, psk)
    pledge.write_context(tmp / "pledge", pledge_id, psk)
    ctx = pledge.load_context(tmp / "pledge")
    seeds = []
    for payload in SEEDS["join-request"]:
        outer, _ = ctx.protect(aiocoap.Message(code=aiocoap.POST, uri_path=("j",),
                                               payload=payload))
        outer.mtype, outer.mid, outer.token = aiocoap.NON, 1, b"\x01"
        seeds.append(outer.encode())
    jrc = CojpJrc(CojpConfig(enabled=True), store)
    yield jrc, seeds
    ctx._destroy()
    store.close()


@fuzz
@given(data=st.data())
def test_jrc_never_raises_and_accepts_no_forgery(handler, data: st.DataObject) -> None:
    jrc, seeds = handler
    wire = data.draw(mutated(seeds))
    try:
        message = aiocoap.Message.decode(wire)
    except Exception:  # aiocoap refuses it before the JRC would see it
        return
    protected = {(bytes(m.opt.oscore), m.payload) for m in map(aiocoap.Message.decode, seeds)}
    before = jrc.counts["joined"] + jrc.counts["retransmission"]
    jrc.handle(message)
    assert jrc.counts["internal-error"] == 0
    if message.opt.oscore is None or (bytes(message.opt.oscore), message.payload) \
            not in protected:
        # Only a seed's own OSCORE option and ciphertext (Class U options aside) can join.
        assert jrc.counts["joined"] + jrc.counts["retransmission"] == before
