"""EDHOC over CoAP framing and the OSCORE values derived from it (RFC 9528 §3.3, App. A).

The key schedule is lakers' (lakers-python, method 3, cipher suite 2); this module holds only
the bytes around it, sans-IO:

* forward flow (App. A.2): the initiator POSTs ``true`` (0xf5) followed by message_1 to
  ``/.well-known/edhoc``; message_2 comes back in a 2.04; the initiator then POSTs C_R
  (CBOR-encoded) followed by message_3;
* connection identifiers as lakers handles them are CBOR encodings: a one-byte integer
  (-24..23) or a byte string; the OSCORE Sender/Recipient ID of an identifier is the integer's
  one-byte encoding or the byte string's content (§3.3.2);
* OSCORE (App. A.1): the initiator's Sender ID is C_R, the responder's is C_I; master secret
  EDHOC_Exporter(0, h'', 16), master salt EDHOC_Exporter(1, h'', 8) for suite 2's AES-CCM-16-
  64-128; no ID context;
* credentials are CWT Claims Sets (RFC 8392) with a COSE_Key (``{2: subject, 8: {1: key}}``),
  the form of the RFC 9529 traces, referenced by ``ID_CRED = {4: kid}``;
* an EDHOC error message is the CBOR sequence (ERR_CODE, ERR_INFO) (§6).
"""

from __future__ import annotations

from typing import Any, Final

import cbor2

from .cbor_strict import _Reader, loads_exact
from .errors import DecodeError, UsageError, ValidationError

MESSAGE_1_PREFIX: Final = b"\xf5"  # CBOR true: "this is message_1" (App. A.2)
MASTER_SECRET_LABEL: Final = 0
MASTER_SALT_LABEL: Final = 1
MASTER_SECRET_LENGTH: Final = 16  # suite 2: application AEAD AES-CCM-16-64-128
MASTER_SALT_LENGTH: Final = 8
ERR_UNSPECIFIED: Final = 1
MAX_MESSAGE: Final = 1024
MAX_CONNECTION_ID: Final = 8  # bytes of a byte-string identifier we accept
COSE_KEY_KTY_EC2: Final = 2
COSE_KEY_CRV_P256: Final = 1


def split_message_1(payload: bytes) -> bytes:
    """message_1 from the first POST's payload (the 0xf5 prefix checked and removed)."""
    if len(payload) > MAX_MESSAGE:
        raise DecodeError(f"EDHOC request of {len(payload)} bytes exceeds {MAX_MESSAGE}")
    if not payload.startswith(MESSAGE_1_PREFIX) or len(payload) == 1:
        raise ValidationError("EDHOC message_1 must follow CBOR true (0xf5)")
    return payload[1:]


def split_message_3(payload: bytes) -> tuple[bytes, bytes]:
    """(C_R as lakers takes it, i.e. CBOR-encoded; message_3) from the second POST."""
    if len(payload) > MAX_MESSAGE:
        raise DecodeError(f"EDHOC request of {len(payload)} bytes exceeds {MAX_MESSAGE}")
    if not payload:
        raise DecodeError("empty EDHOC request")
    reader = _Reader(bytes(payload), "EDHOC C_R")
    value = reader.item(0)
    encoded = payload[:reader.pos]
    check_connection_id(encoded, value)
    if reader.pos == len(payload):
        raise DecodeError("EDHOC message_3 missing after C_R")
    return encoded, payload[reader.pos:]


def check_connection_id(encoded: bytes, value: Any = None) -> None:
    if value is None:
        value = loads_exact(encoded, "EDHOC connection identifier")
    if isinstance(value, int) and not isinstance(value, bool):
        if not -24 <= value <= 23 or len(encoded) != 1:
            raise ValidationError(f"EDHOC connection identifier {encoded.hex()} is not a "
                                  "one-byte int")
    elif isinstance(value, bytes):
        if not value or len(value) > MAX_CONNECTION_ID:
            raise ValidationError(f"EDHOC connection identifier of {len(value)} bytes")
        if len(value) == 1 and (value[0] <= 0x17 or 0x20 <= value[0] <= 0x37):
            # §3.3.2: such a byte string must be sent as the integer of the same encoding.
            raise ValidationError("EDHOC connection identifier sent as a byte string where "
                                  "the one-byte int is required")
    else:
        raise ValidationError("EDHOC connection identifier is neither an int nor bytes")


def oscore_id(encoded: bytes) -> bytes:
    """The OSCORE Sender/Recipient ID of a CBOR-encoded connection identifier."""
    value = loads_exact(encoded, "EDHOC connection identifier")
    check_connection_id(encoded, value)
    return encoded if isinstance(value, int) else value


def connection_id(oscore_identifier: bytes) -> bytes:
    """The CBOR-encoded connection identifier of an OSCORE ID (the inverse of oscore_id)."""
    if len(oscore_identifier) == 1 and (oscore_identifier[0] <= 0x17
                                        or 0x20 <= oscore_identifier[0] <= 0x37):
        return oscore_identifier
    if not 0 < len(oscore_identifier) <= MAX_CONNECTION_ID:
        raise UsageError("an OSCORE ID for EDHOC is 1 to 8 bytes")
    return cbor2.dumps(oscore_identifier)


def error_message(info: str, code: int = ERR_UNSPECIFIED) -> bytes:
    """An EDHOC error message (ERR_CODE, ERR_INFO): code 1 takes a text string."""
    return cbor2.dumps(code) + cbor2.dumps(info)


def ccs(subject: str, kid: bytes, x: bytes, y: bytes) -> bytes:
    """A CWT Claims Set credential for a P-256 static DH key, as in RFC 9529's traces."""
    if len(x) != 32 or len(y) != 32 or not kid:
        raise UsageError("a P-256 CCS needs a kid and 32-byte x and y")
    key = {1: COSE_KEY_KTY_EC2, 2: kid, -1: COSE_KEY_CRV_P256, -2: x, -3: y}
    return cbor2.dumps({2: subject, 8: {1: key}}, canonical=True)


def kid_of_id_cred(id_cred: bytes) -> bytes:
    """The kid of an ID_CRED_x map ``{4: kid}`` (by reference; lakers hands the full map)."""
    value = loads_exact(id_cred, "EDHOC ID_CRED", MAX_MESSAGE)
    if not isinstance(value, dict) or 4 not in value:
        raise ValidationError("EDHOC ID_CRED is not a map with a kid (label 4)")
    kid = value[4]
    if isinstance(kid, int) and not isinstance(kid, bool) and -24 <= kid <= 23:
        return cbor2.dumps(kid)  # a compact one-byte kid: its encoding (§3.5.3.2)
    if not isinstance(kid, bytes) or not kid:
        raise ValidationError("EDHOC ID_CRED kid is not a byte string")
    return kid
