"""A man in the middle for the end-to-end tests, and tests of its voucher transforms.

Run as a script in a lab namespace, it terminates the pledge's TLS with a certificate of its
choosing and forwards every request to the real registrar over a second TLS session in which
it presents the pledge's own IDevID (the test owns that key). On the way back it can alter
the voucher:

    --mode pass     forward as is (with a foreign --server-cert: the proximity check fails)
    --mode tamper   flip one bit inside the signed voucher content
    --mode renonce  re-sign the voucher with the MASA key for another nonce, as a replayed
                    voucher would look: the signature is fine, the nonce is not
    --later-cert C --later-key K
                    show --server-cert on the first TLS connection only, this one on every
                    later connection (the pledge's re-validation against the pinned cert)
    --proximity-cert R
                    rewrite the pledge voucher-request to name R (the real registrar's
                    certificate) as proximity-registrar-cert and sign it again with the
                    pledge's IDevID (--client-key): the registrar then grants a real voucher
                    although the pledge's TLS session showed --server-cert. Only the check of
                    that kept session against the pin can catch this relay.

    python tests/test_enroll_mitm.py --port 9443 --upstream https://[::1]:8443 \\
        --server-cert C --server-key K --client-cert IDEVID.crt --client-key IDEVID.key \\
        --mode tamper [--masa-cert M --masa-key MK]

It prints "mitm: ready" once listening, and "mitm: <mode> <path>" for every voucher changed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import ssl
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from brski import cms
from brski.signed_voucher import sign_voucher_cms, verify_voucher_cms, verify_voucher_request_cms
from brski.voucher import Voucher, VoucherRequest, decode_json

FORWARDED_HEADERS = ("content-type", "accept", "retry-after", "location")
OTHER_NONCE = b"\x5a" * 16


def tamper(body: bytes) -> bytes:
    """One bit flipped in the middle of the signed JSON: the messageDigest no longer fits."""
    content = cms.parse(body).content
    at = body.index(content) + len(content) // 2
    return body[:at] + bytes([body[at] ^ 0x01]) + body[at + 1:]


def renonce(body: bytes, masa_cert: x509.Certificate, masa_key: ec.EllipticCurvePrivateKey,
            now: datetime.datetime) -> bytes:
    """The same voucher for another nonce, properly signed by the MASA."""
    voucher = decode_json(cms.parse(body).content, Voucher)
    return sign_voucher_cms(dataclasses.replace(voucher, nonce=OTHER_NONCE), masa_key,
                            [masa_cert], now)


def reprove(body: bytes, registrar_cert: x509.Certificate, idevid: x509.Certificate,
            idevid_key: ec.EllipticCurvePrivateKey, now: datetime.datetime) -> bytes:
    """The pledge's voucher-request naming ``registrar_cert`` instead, signed by the IDevID."""
    request = decode_json(cms.parse(body).content, VoucherRequest)
    named = registrar_cert.public_bytes(serialization.Encoding.DER)
    return sign_voucher_cms(dataclasses.replace(request, proximity_registrar_cert=named),
                            idevid_key, [idevid], now)


# -- the relay (only run as a script) ------------------------------------------------------


def _server_context(cert: Path, key: Path, later: tuple[Path, Path] | None = None
                    ) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if later is not None:
        later_context = _server_context(*later)
        handshakes = 0

        def switch(sock: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
            # Called for every ClientHello, before the certificate is chosen.
            nonlocal handshakes
            handshakes += 1
            if handshakes > 1:
                sock.context = later_context

        context.sni_callback = switch  # type: ignore[assignment]
    return context


def _client_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(cert, key)
    return context


async def relay(args: argparse.Namespace) -> None:
    from aiohttp import ClientSession, TCPConnector, web

    masa_cert = masa_key = None
    if args.masa_cert:
        masa_cert = x509.load_pem_x509_certificate(args.masa_cert.read_bytes())
        masa_key = serialization.load_pem_private_key(args.masa_key.read_bytes(), None)
    proximity = None
    if args.proximity_cert:
        proximity = (x509.load_pem_x509_certificate(args.proximity_cert.read_bytes()),
                     x509.load_pem_x509_certificate(args.client_cert.read_bytes()),
                     serialization.load_pem_private_key(args.client_key.read_bytes(), None))
    session = ClientSession(connector=TCPConnector(
        ssl=_client_context(args.client_cert, args.client_key), force_close=True))

    async def forward(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        data = await request.read()
        if request.path.endswith("/requestvoucher") and proximity is not None:
            data = reprove(data, *proximity,  # type: ignore[arg-type]
                           datetime.datetime.now(datetime.UTC))
            print(f"mitm: reprove {request.path}", flush=True)
        async with session.request(request.method, args.upstream + request.path_qs,
                                   data=data, headers=headers) as upstream:
            body = await upstream.read()
            status = upstream.status
            back = {k: v for k, v in upstream.headers.items() if k.lower() in FORWARDED_HEADERS}
        if request.path.endswith("/requestvoucher") and status == 200 and args.mode != "pass":
            if args.mode == "tamper":
                body = tamper(body)
            else:
                body = renonce(body, masa_cert, masa_key,  # type: ignore[arg-type]
                               datetime.datetime.now(datetime.UTC))
            print(f"mitm: {args.mode} {request.path}", flush=True)
        return web.Response(status=status, body=body, headers=back)

    later = (args.later_cert, args.later_key) if args.later_cert else None
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "::", args.port,
                       ssl_context=_server_context(args.server_cert, args.server_key, later))
    await site.start()
    print("mitm: ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await session.close()
        await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description="TLS-terminating relay that alters vouchers")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--server-cert", type=Path, required=True)
    p.add_argument("--server-key", type=Path, required=True)
    p.add_argument("--client-cert", type=Path, required=True)
    p.add_argument("--client-key", type=Path, required=True)
    p.add_argument("--mode", choices=("pass", "tamper", "renonce"), default="pass")
    p.add_argument("--masa-cert", type=Path)
    p.add_argument("--masa-key", type=Path)
    p.add_argument("--later-cert", type=Path)
    p.add_argument("--later-key", type=Path)
    p.add_argument("--proximity-cert", type=Path)
    args = p.parse_args()
    if args.mode == "renonce" and not (args.masa_cert and args.masa_key):
        p.error("--mode renonce needs --masa-cert and --masa-key")
    asyncio.run(relay(args))


# -- tests of the transforms, so the end-to-end tests can rely on them ---------------------

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)


def _voucher():  # type: ignore[no-untyped-def]
    from brski.pki import create_test_pki
    from brski.voucher import Assertion

    pki = create_test_pki(NOW)
    voucher = Voucher(serial_number="x-1", assertion=Assertion.PROXIMITY, nonce=b"\x01" * 16,
                      pinned_domain_cert=pki.domain_ca.cert.public_bytes(
                          serialization.Encoding.DER))
    return pki, sign_voucher_cms(voucher, pki.masa_signer.key, [pki.masa_signer.cert], NOW)


def test_tamper_breaks_the_signature_and_nothing_else():
    import pytest

    from brski.errors import SignatureError

    pki, data = _voucher()
    bad = tamper(data)
    assert len(bad) == len(data) and bad != data
    verify_voucher_cms(data, [pki.masa_ca.cert], NOW)
    with pytest.raises(SignatureError, match="altered"):
        verify_voucher_cms(bad, [pki.masa_ca.cert], NOW)


def test_renonce_keeps_a_valid_masa_signature_with_another_nonce():
    pki, data = _voucher()
    other = renonce(data, pki.masa_signer.cert, pki.masa_signer.key, NOW)
    voucher, signer = verify_voucher_cms(other, [pki.masa_ca.cert], NOW)
    assert signer == pki.masa_signer.cert
    assert voucher.nonce == OTHER_NONCE and voucher.serial_number == "x-1"


def test_reprove_names_another_registrar_under_a_valid_idevid_signature():
    pki = create_test_pki_with_idevid()
    idevid = pki.idevids["x-1"]
    from brski.voucher import Assertion

    shown = pki.masa_tls.cert.public_bytes(serialization.Encoding.DER)  # what a relay showed
    pvr = sign_voucher_cms(VoucherRequest(serial_number="x-1", nonce=b"\x01" * 16,
                                          assertion=Assertion.PROXIMITY,
                                          proximity_registrar_cert=shown),
                           idevid.key, [idevid.cert], NOW)
    other = reprove(pvr, pki.registrar.cert, idevid.cert, idevid.key, NOW)
    request, signer = verify_voucher_request_cms(other, [pki.manufacturer_ca.cert], NOW)
    assert signer == idevid.cert and request.nonce == b"\x01" * 16
    assert request.proximity_registrar_cert == pki.registrar.cert.public_bytes(
        serialization.Encoding.DER)


def create_test_pki_with_idevid():  # type: ignore[no-untyped-def]
    from brski.pki import create_test_pki

    return create_test_pki(NOW, serials=["x-1"])


if __name__ == "__main__":
    sys.exit(main())
