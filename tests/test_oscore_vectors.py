"""RFC 8613 Appendix C through aiocoap's OSCORE code: the library the CoJP JRC and pledge use.

Keys, IVs and nonces of C.1-C.3 derived from each vector's master secret, salt, IDs and ID
context; the requests C.4-C.6 protected and compared byte for byte; the server side unprotects
them and protects the responses C.7 (nonce reused) and C.8 (own Partial IV) byte-exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

oscore = pytest.importorskip("aiocoap.oscore")
from aiocoap import Message  # noqa: E402
from aiocoap.message import Direction  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402


class VectorContext(oscore.CanProtect, oscore.CanUnprotect, oscore.SecurityContextUtils):
    """An in-memory context: the RFC's parameters, nothing persisted (these are vectors)."""

    echo_recovery = None  # the window starts empty and known: no RFC 9175 Echo round

    def __init__(self, vector: dict[str, str], *, sequence_number: int = 0) -> None:
        self.sender_id = bytes.fromhex(vector["Sender ID"])
        self.recipient_id = bytes.fromhex(vector["Recipient ID"])
        self.id_context = bytes.fromhex(vector["ID Context"]) if "ID Context" in vector else None
        self.alg_aead = oscore.algorithms["AES-CCM-16-64-128"]
        self.hashfun = hashes.SHA256()
        self.derive_keys(bytes.fromhex(vector.get("Master Salt", "")),
                         bytes.fromhex(vector["Master Secret"]))
        self.sender_sequence_number = sequence_number
        self.recipient_replay_window = oscore.ReplayWindow(32, lambda: None)
        self.recipient_replay_window.initialize_empty()

    def post_seqnoincrease(self) -> None:
        pass


@pytest.fixture(scope="module")
def appendix_c(vectors: Path) -> dict[str, dict[str, str]]:
    return json.loads((vectors / "rfc8613-oscore" / "rfc8613-appendixC.json").read_text())


def _outgoing(data: bytes) -> Message:
    message = Message.decode(data)
    message.direction = Direction.OUTGOING
    return message


def _wire(outer: Message, original: Message) -> bytes:
    """The outer message as sent: protect() leaves type, message ID and token to the sender."""
    outer.mtype, outer.mid, outer.token = original.mtype, original.mid, original.token
    return outer.encode()


@pytest.mark.parametrize("section", ["C.1.1", "C.1.2", "C.2.1", "C.2.2", "C.3.1", "C.3.2"])
def test_key_derivation(appendix_c: dict, section: str) -> None:
    vector = appendix_c[section]
    ctx = VectorContext(vector)
    assert ctx.sender_key.hex() == vector["Sender Key"]
    assert ctx.recipient_key.hex() == vector["Recipient Key"]
    assert ctx.common_iv.hex() == vector["Common IV"]
    alg = ctx.alg_aead
    # Nonces for Partial IV 0 of each side (§5.2), as the vectors list them.
    assert ctx._construct_nonce(b"\0", ctx.sender_id, alg).hex() == vector["sender nonce"]
    assert ctx._construct_nonce(b"\0", ctx.recipient_id, alg).hex() == vector["recipient nonce"]


@pytest.mark.parametrize(("section", "client"), [("C.4", "C.1.1"), ("C.5", "C.2.1"),
                                                 ("C.6", "C.3.1")])
def test_request_protection(appendix_c: dict, section: str, client: str) -> None:
    vector = appendix_c[section]
    ctx = VectorContext(appendix_c[client], sequence_number=int(vector["Sender Sequence Number"]))
    assert ctx.common_iv.hex() == vector["Common IV"]
    plain = _outgoing(bytes.fromhex(vector["Unprotected CoAP request"]))
    protected, _ = ctx.protect(plain)
    assert protected.opt.oscore.hex() == vector["OSCORE option value"]
    assert protected.payload.hex() == vector["ciphertext"]
    assert _wire(protected, plain).hex() == vector["Protected CoAP request (OSCORE message)"]


@pytest.mark.parametrize(("request_section", "server"), [("C.4", "C.1.2"), ("C.5", "C.2.2"),
                                                         ("C.6", "C.3.2")])
def test_server_unprotects_the_requests(appendix_c: dict, request_section: str,
                                        server: str) -> None:
    vector = appendix_c[request_section]
    ctx = VectorContext(appendix_c[server])
    request = Message.decode(bytes.fromhex(vector["Protected CoAP request (OSCORE message)"]))
    plain, _ = ctx.unprotect(request)
    expected = Message.decode(bytes.fromhex(vector["Unprotected CoAP request"]))
    assert plain.code == expected.code and plain.opt.uri_path == expected.opt.uri_path
    # The same bytes again are a replay (§7.4), not a second request.
    with pytest.raises(oscore.ReplayError):
        ctx.unprotect(Message.decode(bytes.fromhex(
            vector["Protected CoAP request (OSCORE message)"])))


def test_tampered_request_fails_verification(appendix_c: dict) -> None:
    wire = bytearray(bytes.fromhex(appendix_c["C.4"]["Protected CoAP request (OSCORE message)"]))
    wire[-1] ^= 0x01
    with pytest.raises(oscore.ProtectionInvalid):
        VectorContext(appendix_c["C.1.2"]).unprotect(Message.decode(bytes(wire)))


@pytest.mark.parametrize("section", ["C.7", "C.8"])
def test_response_protection(appendix_c: dict, section: str) -> None:
    vector = appendix_c[section]
    server = VectorContext(appendix_c["C.1.2"],
                           sequence_number=int(vector["Sender Sequence Number"]))
    request = Message.decode(bytes.fromhex(appendix_c["C.4"]["Protected CoAP request "
                                                            "(OSCORE message)"]))
    _, request_id = server.unprotect(request)
    if "Partial IV" in vector:  # C.8: the server uses a Partial IV of its own
        request_id.can_reuse_nonce = False
    response = _outgoing(bytes.fromhex(vector["Unprotected CoAP response"]))
    protected, _ = server.protect(response, request_id)
    assert protected.opt.oscore.hex() == vector["OSCORE option value"]
    assert protected.payload.hex() == vector["ciphertext"]
    wire = _wire(protected, response)
    assert wire.hex() == vector["Protected CoAP response (OSCORE message)"]
    # And the client of C.1.1 opens it.
    client = VectorContext(appendix_c["C.1.1"], sequence_number=20)
    _, client_request_id = client.protect(
        _outgoing(bytes.fromhex(appendix_c["C.4"]["Unprotected CoAP request"])))
    plain, _ = client.unprotect(Message.decode(wire), client_request_id)
    assert plain.payload == b"Hello World!"
