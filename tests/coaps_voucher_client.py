"""A cBRSKI pledge's first two requests over coaps_io's aiocoap client, run inside a lab
namespace by tests/test_coaps_relay.py: POST /.well-known/brski/rv (a COSE PVR) and
POST /.well-known/est/sen (a CSR) in one DTLS session with the IDevID.

    coaps_voucher_client.py PKI_DIR SERIAL URI OUT_DIR

Writes OUT_DIR/voucher.cose, OUT_DIR/ldevid.der and OUT_DIR/nonce.bin; prints the codes.
"""

import asyncio
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiocoap
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from brski.dtls import DtlsConfig
from coaps_io.aiocoap_dtls import create_client_context
from lab.registrar_testing import load_issued
from tests.test_masa_cose import cose_pvr


async def main(pki: Path, serial: str, uri: str, out: Path) -> None:
    idevid = load_issued(pki / f"manufacturer/idevid/{serial}.crt",
                         pki / f"manufacturer/idevid/{serial}.key")
    registrar = x509.load_pem_x509_certificate((pki / "domain/registrar.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((pki / "domain/ca.crt").read_bytes())
    nonce = os.urandom(8)
    pvr = cose_pvr(idevid, serial, registrar, nonce=nonce)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(idevid.cert.subject)
           .sign(key, hashes.SHA256())).public_bytes(Encoding.DER)
    ctx, _ = await create_client_context(DtlsConfig(idevid.cert, idevid.key, [ca]))
    try:
        rv = await ctx.request(aiocoap.Message(
            code=aiocoap.POST, uri=f"{uri}/.well-known/brski/rv", payload=pvr,
            content_format=836)).response
        sen = await ctx.request(aiocoap.Message(
            code=aiocoap.POST, uri=f"{uri}/.well-known/est/sen", payload=csr,
            content_format=286, accept=287)).response
    finally:
        await ctx.shutdown()
    (out / "voucher.cose").write_bytes(rv.payload)
    (out / "ldevid.der").write_bytes(sen.payload)
    (out / "nonce.bin").write_bytes(nonce)
    print(json.dumps({"rv": str(rv.code), "sen": str(sen.code)}))


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3],
                                      Path(sys.argv[4])), 60))
