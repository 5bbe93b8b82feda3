"""brski-voucher: look at, check and sign vouchers and voucher-requests.

    brski-voucher decode FILE
    brski-voucher verify FILE --trust CERT [--trust CERT ...] [--at TIME] [--nonce N] [--serial S]
    brski-voucher sign --in JSON --key KEY [--cert CERT ...] [--format cms|cose] --out FILE

FILE may be JSON (an unsigned voucher), CMS as DER, PEM or base64 (.pkcs, .b64, .vcj), or
COSE_Sign1 / unsigned CBOR as binary or hex (.bin, .hex, .vch). ``decode`` prints the voucher
as RFC 7951 JSON without checking anything. ``verify`` exits 0 only if the signature, the
chain to a ``--trust`` certificate at ``--at`` (default: now) and the voucher rules hold;
otherwise it prints one line saying why and exits 1. Exit status 2: the command line or a
file could not be used.

``sign --format cose`` without ``--cert`` makes a COSE_Sign1 with no x5bag: what a pledge sends
as its voucher-request (cBRSKI §9.2; the registrar knows the IDevID from the DTLS handshake).
Verify such a file, or a voucher the registrar stripped of its x5bag, with ``--trust`` naming
the signer's own certificate (the IDevID, the MASA's voucher signer).
"""

from __future__ import annotations

import argparse
import binascii
import json
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from .. import __version__, cms, cose
from ..chain import describe, load_certificate
from ..errors import BrskiError, DecodeError
from ..signed_voucher import (
    check_voucher,
    sign_voucher_cms,
    sign_voucher_cose,
    verify_voucher_cms,
    verify_voucher_cose,
    verify_voucher_request_cms,
    verify_voucher_request_cose,
)
from ..voucher import (
    Voucher,
    VoucherArtifact,
    VoucherRequest,
    decode_cbor,
    decode_json,
    encode_json,
    parse_datetime,
)

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
_HEX = re.compile(rb"[0-9A-Fa-f\s]+")
_BASE64 = re.compile(rb"[A-Za-z0-9+/=\s]+")
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)


class CliError(Exception):
    """A file or argument this tool cannot use (exit 2)."""


# --- reading inputs -------------------------------------------------------------------------


def read_input(raw: bytes) -> tuple[str, bytes]:
    """(format, bytes) for a file's contents: format is json, cms, cose or cbor."""
    text = raw.strip()
    pem = _PEM.search(text)
    if pem is not None:
        return _classify(_b64(pem.group(2)))
    if text[:1] == b"{":
        return "json", raw
    if text and _HEX.fullmatch(text) and len(re.sub(rb"\s", b"", text)) % 2 == 0:
        return _classify(binascii.unhexlify(re.sub(rb"\s", b"", text)))
    if text and _BASE64.fullmatch(text):
        return _classify(_b64(text))
    return _classify(raw)


def _classify(data: bytes) -> tuple[str, bytes]:
    first = data[:1]
    if first == b"\x30":  # DER SEQUENCE: a CMS ContentInfo
        return "cms", data
    if first in (b"\xd2", b"\x84"):  # tag 18 / array(4): COSE_Sign1
        return "cose", data
    if first and 0xA0 <= first[0] <= 0xBF:  # a CBOR map: an unsigned SID voucher
        return "cbor", data
    raise DecodeError("not JSON, CMS, COSE_Sign1 or a CBOR voucher")


def _b64(text: bytes) -> bytes:
    try:
        return binascii.a2b_base64(re.sub(rb"\s", b"", text), strict_mode=True)
    except binascii.Error as exc:
        raise DecodeError(f"bad base64: {exc}") from exc


def decode_unsigned_json(raw: bytes) -> VoucherArtifact:
    """JSON as given, else with line breaks removed: RFC example files fold long lines, even
    inside strings (anima-bootstrap examples/*.json), and readers should still open them."""
    try:
        return decode_json(raw)
    except DecodeError:
        unfolded = re.sub(rb"\r?\n", b"", raw.strip())
        if unfolded == raw:
            raise
        return decode_json(unfolded)


def unverified(fmt: str, data: bytes) -> VoucherArtifact:
    if fmt == "json":
        return decode_unsigned_json(data)
    if fmt == "cbor":
        return decode_cbor(data)
    if fmt == "cms":
        return decode_json(cms.parse(data).content)
    return decode_cbor(cose.decode(data).payload)


def load_certificates(path: Path) -> list[x509.Certificate]:
    raw = _read(path)
    try:
        ders = [_b64(m.group(2)) for m in _PEM.finditer(raw) if m.group(1) == b"CERTIFICATE"]
        return [load_certificate(der, str(path)) for der in ders or [raw]]
    except DecodeError as exc:
        raise CliError(str(exc)) from exc


def load_key(path: Path) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
    raw = _read(path)
    try:
        if b"-----BEGIN" in raw:
            key = serialization.load_pem_private_key(raw, password=None)
        else:
            key = serialization.load_der_private_key(raw, password=None)
    except (ValueError, TypeError) as exc:
        raise CliError(f"{path}: not an unencrypted private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise CliError(f"{path}: an EC or Ed25519 key is needed, not {type(key).__name__}")
    return key


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror or exc}") from exc


def _time(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        return parse_datetime(text)
    except DecodeError as exc:
        raise CliError(f"--at: {exc} (use e.g. 2021-04-14T00:00:00Z)") from exc


# --- commands -------------------------------------------------------------------------------


def cmd_decode(args: argparse.Namespace) -> int:
    fmt, data = read_input(_read(args.file))
    artifact = unverified(fmt, data)
    pretty = json.dumps(json.loads(encode_json(artifact)), indent=2, ensure_ascii=False)
    print(pretty)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    anchors = [cert for path in args.trust for cert in load_certificates(path)]
    now = _time(args.at)
    fmt, data = read_input(_read(args.file))
    if fmt in ("json", "cbor"):
        print("brski-voucher: invalid: the file is not signed", file=sys.stderr)
        return EXIT_INVALID
    is_request = isinstance(unverified(fmt, data), VoucherRequest)
    artifact: VoucherArtifact
    if fmt == "cms" and is_request:
        artifact, signer = verify_voucher_request_cms(data, anchors, now)
    elif fmt == "cms":
        artifact, signer = verify_voucher_cms(data, anchors, now)
    elif is_request:
        artifact, signer = verify_voucher_request_cose(data, anchors, now)
    else:
        artifact, signer = verify_voucher_cose(data, anchors, now)
    if isinstance(artifact, Voucher) or args.nonce or args.serial:
        check_voucher(artifact, serial_number=args.serial, nonce=args.nonce)
    who = describe(signer) if signer is not None else "the given key"
    kind = "voucher-request" if is_request else "voucher"
    print(f"valid {fmt.upper()} {kind} for serial-number {artifact.serial_number}, signed by {who}")
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    artifact = decode_unsigned_json(_read(args.input))
    key = load_key(args.key)
    certs = [cert for path in args.cert or () for cert in load_certificates(path)]
    if args.format == "cms":
        if not certs:
            raise CliError("CMS needs --cert: the signer certificate travels in the message")
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CliError("CMS vouchers are signed with ECDSA keys")
        out = sign_voucher_cms(artifact, key, certs, datetime.now(UTC))
    else:
        out = sign_voucher_cose(artifact, key, x5bag=certs)
    try:
        args.out.write_bytes(out)
    except OSError as exc:
        raise CliError(f"{args.out}: {exc.strerror or exc}") from exc
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="brski-voucher", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"brski-voucher {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("decode", help="print a voucher or voucher-request as JSON (unverified)")
    d.add_argument("file", type=Path)
    d.set_defaults(func=cmd_decode)
    v = sub.add_parser("verify", help="check signature, chain and voucher rules")
    v.add_argument("file", type=Path)
    v.add_argument(
        "--trust",
        type=Path,
        action="append",
        required=True,
        metavar="CERT",
        help="trust anchor certificate (PEM or DER); repeatable",
    )
    v.add_argument("--at", metavar="TIME", help="verification time, RFC 3339 (default: now)")
    v.add_argument(
        "--nonce",
        help="the nonce the pledge sent (JSON text or base64; write --nonce=N if N starts with -)",
    )
    v.add_argument("--serial", help="the pledge's serial-number")
    v.set_defaults(func=cmd_verify)
    s = sub.add_parser("sign", help="sign a JSON voucher or voucher-request")
    s.add_argument("--in", dest="input", type=Path, required=True, metavar="JSON")
    s.add_argument("--key", type=Path, required=True)
    s.add_argument(
        "--cert",
        type=Path,
        action="append",
        help="signer certificate and chain (PEM or DER); repeatable; required for CMS, "
             "optional for COSE (none: no x5bag, as in a pledge's voucher-request)",
    )
    s.add_argument("--format", choices=("cms", "cose"), default="cms")
    s.add_argument("--out", type=Path, required=True)
    s.set_defaults(func=cmd_sign)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"brski-voucher: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except BrskiError as exc:
        # One line, never a traceback (design.md: bad input gets a clear error).
        print(f"brski-voucher: invalid: {_one_line(exc)}", file=sys.stderr)
        return EXIT_INVALID


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
