"""RFC 9529 trace 2 (method 3, cipher suite 2: what lakers-python supports) against lakers.

lakers-python 0.6.2 draws its ephemeral keys (X, Y) inside Rust and has no call to fix them, so
message_2, message_3 and the trace's PRK_out/OSCORE secrets cannot be reproduced byte for byte.
What the library exposes is checked byte-exact against the trace: the credentials CRED_I/CRED_R
(kid, public key), the responder's processing of the trace's message_1 (C_I, no EAD) and its
refusal of the first message_1 (suite 6 only: the trace's error 2), ID_CRED_I/ID_CRED_R as
the peers see them, and the message framing and sizes of a handshake run with the trace's
static keys and connection identifiers; both sides must derive the same OSCORE secret and salt.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

lakers = pytest.importorskip("lakers")


@pytest.fixture(scope="module")
def trace(vectors: Path) -> dict[str, dict[str, str]]:
    return json.loads((vectors / "rfc9529-edhoc" / "rfc9529-traces.json").read_text())[
        "sec-trace-2"]


def value(trace: dict, section: str, prefix: str) -> bytes:
    return bytes.fromhex(next(v for k, v in trace[section].items() if k.startswith(prefix)))


def test_credentials_parse_to_the_trace_values(trace: dict) -> None:
    cred_r = lakers.Credential(value(trace, "message_2", "CRED_R"))
    cred_i = lakers.Credential(value(trace, "message_3", "CRED_I"))
    assert cred_r.kid() == bytes.fromhex("32") and cred_i.kid() == bytes.fromhex("2b")
    assert cred_r.public_key() == value(trace, "message_2",
                                        "Responder's public authentication key, 'x'")
    assert cred_i.public_key() == value(trace, "message_3",
                                        "Initiator's public authentication key, 'x'")


def test_responder_processes_the_trace_message_1(trace: dict) -> None:
    responder = lakers.EdhocResponder(value(trace, "message_2", "SK_R"),
                                      lakers.Credential(value(trace, "message_2", "CRED_R")))
    c_i, ead_1 = responder.process_message_1(value(trace, "message_1 (second time)",
                                                   "message_1"))
    assert c_i == value(trace, "message_1 (second time)", "C_I (Raw Value)")
    assert ead_1 == []


def test_responder_refuses_the_suite_6_message_1(trace: dict) -> None:
    # The trace's first message_1 offers suite 6 only; the responder answers error 2 (0202).
    responder = lakers.EdhocResponder(value(trace, "message_2", "SK_R"),
                                      lakers.Credential(value(trace, "message_2", "CRED_R")))
    with pytest.raises(ValueError, match="UnsupportedCipherSuite"):
        responder.process_message_1(value(trace, "message_1 (first time)", "message_1"))
    assert value(trace, "error", "error") == bytes.fromhex("0202")


def _handshake(trace: dict, *, tamper_3: bool = False,
               expected_cred_i: bytes | None = None) -> tuple:
    cred_i = lakers.Credential(value(trace, "message_3", "CRED_I"))
    cred_r = lakers.Credential(value(trace, "message_2", "CRED_R"))
    c_i = value(trace, "message_1 (second time)", "C_I (Raw Value)")
    c_r = value(trace, "message_2", "C_R (raw value)")
    initiator = lakers.EdhocInitiator()
    responder = lakers.EdhocResponder(value(trace, "message_2", "SK_R"), cred_r)
    m1 = initiator.prepare_message_1(c_i=c_i)
    assert responder.process_message_1(m1) == (c_i, [])
    m2 = responder.prepare_message_2(lakers.CredentialTransfer.ByReference, c_r=c_r)
    got_c_r, id_cred_r, ead_2 = initiator.parse_message_2(m2)
    initiator.verify_message_2(value(trace, "message_3", "SK_I"), cred_i, cred_r)
    m3, prk_out_i = initiator.prepare_message_3(lakers.CredentialTransfer.ByReference)
    if tamper_3:
        m3 = m3[:-1] + bytes([m3[-1] ^ 1])
    id_cred_i, ead_3 = responder.parse_message_3(m3)
    expected = lakers.Credential(expected_cred_i) if expected_cred_i else cred_i
    prk_out_r = responder.verify_message_3(expected)
    initiator.completed_without_message_4()
    responder.completed_without_message_4()
    return (m1, m2, m3, got_c_r, id_cred_r, id_cred_i, prk_out_i, prk_out_r,
            initiator, responder, ead_2, ead_3)


def test_handshake_with_the_trace_keys(trace: dict) -> None:
    (m1, m2, m3, c_r, id_cred_r, id_cred_i, prk_i, prk_r, initiator, responder,
     ead_2, ead_3) = _handshake(trace)
    trace_m1 = value(trace, "message_1 (second time)", "message_1")
    # message_1 = (METHOD 3, SUITES_I 2, G_X bstr(32), C_I): the trace's framing, with suite 2
    # alone where the trace (after its error round) lists [6, 2].
    assert m1[:1] == trace_m1[:1] == b"\x03"
    assert m1[1:4] == b"\x02\x58\x20" and trace_m1[1:6] == bytes.fromhex("8206025820")
    assert m1[-1:] == trace_m1[-1:] and len(m1) == len(trace_m1) - 2
    assert len(m2) == len(value(trace, "message_2", "message_2"))  # 45 bytes
    assert len(m3) == len(value(trace, "message_3", "message_3"))  # 19 bytes
    assert m2[:2] == b"\x58\x2b" and m3[:1] == b"\x52"
    assert c_r == value(trace, "message_2", "C_R (raw value)")
    assert id_cred_r == value(trace, "message_2", "ID_CRED_R")
    assert id_cred_i == value(trace, "message_3", "ID_CRED_I")
    assert ead_2 == [] and ead_3 == []
    assert prk_i == prk_r and len(prk_i) == 32
    # OSCORE (RFC 9528 App. A.1): master secret = exporter(0, h'', 16), salt = exporter(1, h'', 8).
    secret = initiator.edhoc_exporter(0, b"", 16)
    salt = initiator.edhoc_exporter(1, b"", 8)
    assert secret == responder.edhoc_exporter(0, b"", 16) and len(secret) == 16
    assert salt == responder.edhoc_exporter(1, b"", 8) and len(salt) == 8
    assert len(value(trace, "OSCORE Parameters", "OSCORE Master Secret")) == len(secret)
    assert len(value(trace, "OSCORE Parameters", "OSCORE Master Salt")) == len(salt)
    # The trace's OSCORE Sender IDs: the initiator (client) sends with C_R, the server with C_I.
    assert value(trace, "OSCORE Parameters", "Client's OSCORE Sender ID") == c_r


def test_tampered_message_3_is_refused(trace: dict) -> None:
    with pytest.raises(ValueError, match="EDHOCError"):
        _handshake(trace, tamper_3=True)


def test_unexpected_initiator_credential_is_refused(trace: dict) -> None:
    with pytest.raises(ValueError, match="EDHOCError"):
        _handshake(trace, expected_cred_i=value(trace, "message_2", "CRED_R"))
