"""A reference for bench/masa_vouchers.py: the MASA's CMS work done in C, by the system's
OpenSSL (libcrypto through ctypes), as HAProxy is the C reference for the circuit relay.

Per voucher, as ``registrar.masa`` does it: the RVR parsed and its signature checked
(``CMS_verify``, the registrar's certificate not chained: the owner check does that, from a
cache); its JSON read and the PVR taken out of it; the PVR parsed, its signature checked and
its signer chained to the manufacturer CA (``CMS_verify`` with an ``X509_STORE``: RFC 5280
path validation, ``X509_verify_cert``); its JSON read; the voucher's JSON written and signed
(``CMS_sign``, signingTime and the chain included) and encoded. What is left in Python is one
``json`` call per document and the serial-number and nonce comparisons.

Measurement only: nothing here is used by the product (brski/ reads and writes CMS). The
standard library only, so that it can run against another system's libcrypto too (a Debian 13
root, say).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import time
from base64 import b64decode, b64encode
from collections.abc import Callable, Sequence

CMS_NO_SIGNER_CERT_VERIFY = 0x20
CMS_BINARY = 0x80
CMS_NOSMIMECAP = 0x200
X509_PURPOSE_ANY = 7
BIO_CTRL_INFO = 3  # BIO_get_mem_data


class OpenSslError(RuntimeError):
    pass


def _lib(name: str | None) -> ctypes.CDLL:
    lib = ctypes.CDLL(name or ctypes.util.find_library("crypto") or "libcrypto.so.3")
    p, i, c = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
    signatures = {
        "BIO_new_mem_buf": (p, [c, i]), "BIO_new": (p, [p]), "BIO_s_mem": (p, []),
        "BIO_free": (i, [p]), "BIO_ctrl": (ctypes.c_long, [p, i, ctypes.c_long, p]),
        "d2i_CMS_bio": (p, [p, p]), "i2d_CMS_bio": (i, [p, p]),
        "CMS_ContentInfo_free": (None, [p]),
        "CMS_verify": (i, [p, p, p, p, p, ctypes.c_uint]),
        "CMS_sign": (p, [p, p, p, p, ctypes.c_uint]),
        "d2i_X509": (p, [p, ctypes.POINTER(c), ctypes.c_long]), "X509_free": (None, [p]),
        "X509_STORE_new": (p, []), "X509_STORE_add_cert": (i, [p, p]),
        "X509_STORE_set_purpose": (i, [p, i]),
        "OPENSSL_sk_new_null": (p, []), "OPENSSL_sk_push": (i, [p, p]),
        "PEM_read_bio_PrivateKey": (p, [p, p, p, p]),
        "ERR_get_error": (ctypes.c_ulong, []), "OpenSSL_version": (c, [i]),
        "ERR_error_string_n": (None, [ctypes.c_ulong, c, ctypes.c_size_t]),
    }
    for fn, (restype, argtypes) in signatures.items():
        getattr(lib, fn).restype = restype
        getattr(lib, fn).argtypes = argtypes
    return lib



class OpenSslMasa:
    """The MASA's CMS work for one voucher, in libcrypto. ``voucher(rvr_der)`` -> the signed
    voucher's DER; raises OpenSslError where the MASA would refuse. Certificates are DER."""

    def __init__(self, manufacturer_cas: Sequence[bytes], signer_chain: Sequence[bytes],
                 signer_key_pem: bytes, domain_ca: bytes, library: str | None = None) -> None:
        self.lib = lib = _lib(library)
        # the owner check's outcome (the MASA keeps it per registrar chain): the pinned CA
        self.pinned = b64encode(domain_ca).decode()
        self.anchors = lib.X509_STORE_new()
        for ca in manufacturer_cas:
            cert = self._x509(ca)
            lib.X509_STORE_add_cert(self.anchors, cert)
            lib.X509_free(cert)  # the store holds its own reference
        # IDevIDs carry no S/MIME key usage: any purpose, as brski.chain's BRSKI profile
        lib.X509_STORE_set_purpose(self.anchors, X509_PURPOSE_ANY)
        self.signer = self._x509(signer_chain[0])
        self.extra = lib.OPENSSL_sk_new_null()
        for cert in signer_chain[1:]:
            lib.OPENSSL_sk_push(self.extra, self._x509(cert))
        bio = self._mem(signer_key_pem)
        self.key = lib.PEM_read_bio_PrivateKey(bio, None, None, None)
        lib.BIO_free(bio)
        if not self.key:
            raise OpenSslError(self._error("the signer key"))

    def voucher(self, rvr_der: bytes, now_text: str) -> bytes:
        rvr = json.loads(self._verified(rvr_der, None))
        body = rvr["ietf-voucher-request:voucher"]
        pvr = json.loads(self._verified(b64decode(body["prior-signed-voucher-request"]),
                                        self.anchors))["ietf-voucher-request:voucher"]
        if pvr["serial-number"] != body["serial-number"] or pvr.get("nonce") != body.get("nonce"):
            raise OpenSslError("the RVR and the PVR disagree")
        voucher = {"ietf-voucher:voucher": {
            "assertion": "proximity", "created-on": now_text,
            "serial-number": body["serial-number"], "nonce": body.get("nonce"),
            "pinned-domain-cert": self.pinned}}
        return self._signed(json.dumps(voucher, separators=(",", ":")).encode())

    # -- the C calls ----------------------------------------------------------------------
    def version(self) -> str:
        return self.lib.OpenSSL_version(0).decode()

    def _verified(self, der: bytes, anchors: int | None) -> bytes:
        lib = self.lib
        bio = self._mem(der)
        cms = lib.d2i_CMS_bio(bio, None)
        lib.BIO_free(bio)
        if not cms:
            raise OpenSslError(self._error("not a CMS structure"))
        flags = CMS_BINARY | (0 if anchors else CMS_NO_SIGNER_CERT_VERIFY)
        return self._drained(cms, "CMS_verify",
                             lambda out: lib.CMS_verify(cms, None, anchors, None, out, flags))

    def _signed(self, content: bytes) -> bytes:
        lib = self.lib
        data = self._mem(content)
        cms = lib.CMS_sign(self.signer, self.key, self.extra, data, CMS_BINARY | CMS_NOSMIMECAP)
        lib.BIO_free(data)
        if not cms:
            raise OpenSslError(self._error("CMS_sign"))
        return self._drained(cms, "i2d_CMS_bio", lambda out: lib.i2d_CMS_bio(out, cms))

    def _drained(self, cms: int, what: str, step: Callable[[int], int]) -> bytes:
        """What ``step`` writes into a memory BIO (it returns 1 on success); ``cms`` is
        freed either way."""
        lib = self.lib
        out = lib.BIO_new(lib.BIO_s_mem())
        try:
            if step(out) != 1:
                raise OpenSslError(self._error(what))
            return self._read(out)
        finally:
            lib.BIO_free(out)
            lib.CMS_ContentInfo_free(cms)

    def _mem(self, data: bytes) -> int:
        return self.lib.BIO_new_mem_buf(data, len(data))

    def _read(self, bio: int) -> bytes:
        pointer = ctypes.c_char_p()
        size = self.lib.BIO_ctrl(bio, BIO_CTRL_INFO, 0, ctypes.byref(pointer))
        return ctypes.string_at(pointer, size)

    def _x509(self, der: bytes) -> int:
        pointer = ctypes.c_char_p(der)
        handle = self.lib.d2i_X509(None, ctypes.byref(pointer), len(der))
        if not handle:
            raise OpenSslError(self._error("a certificate"))
        return handle

    def _error(self, what: str) -> str:
        code = self.lib.ERR_get_error()
        text = ctypes.create_string_buffer(256)
        self.lib.ERR_error_string_n(code, text, len(text))
        return f"{what}: {text.value.decode(errors='replace')}"


# -- standalone: the reference alone, against any root's libcrypto --------------------------
def cost(masa: OpenSslMasa, rvrs: Sequence[bytes], now: str, passes: int = 5) -> list[float]:
    """CPU µs per voucher of the CMS work alone (no store), one value per pass over ``rvrs``."""
    out = []
    for _ in range(passes):
        start = time.process_time()
        for rvr in rvrs:
            masa.voucher(rvr, now)
        out.append((time.process_time() - start) / len(rvrs) * 1e6)
    return out


def save_requests(path: str, rvrs: Sequence[bytes], manufacturer_cas: Sequence[bytes],
                  signer_chain: Sequence[bytes], signer_key_pem: bytes, domain_ca: bytes,
                  now: str) -> None:
    """What ``main`` needs, as JSON (bench/masa_vouchers.py --save-requests)."""
    def b64(items: Sequence[bytes]) -> list[str]:
        return [b64encode(i).decode() for i in items]

    with open(path, "w") as out:
        json.dump({"rvrs": b64(rvrs), "manufacturer_cas": b64(manufacturer_cas),
                   "signer_chain": b64(signer_chain), "signer_key_pem": signer_key_pem.decode(),
                   "domain_ca": b64encode(domain_ca).decode(), "now": now}, out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="The MASA's CMS voucher work in this system's OpenSSL, alone: CPU per "
                    "voucher. Runs with the standard library only, e.g. chrooted into a "
                    "Debian 13 root to measure its OpenSSL.")
    parser.add_argument("requests", help="JSON from bench/masa_vouchers.py --save-requests")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--library", help="libcrypto to load (default: the system's)")
    args = parser.parse_args()
    with open(args.requests) as f:
        saved = json.load(f)
    masa = OpenSslMasa([b64decode(c) for c in saved["manufacturer_cas"]],
                       [b64decode(c) for c in saved["signer_chain"]],
                       saved["signer_key_pem"].encode(), b64decode(saved["domain_ca"]),
                       args.library)
    per_pass = sorted(cost(masa, [b64decode(r) for r in saved["rvrs"]], saved["now"],
                           args.passes))
    print(f"{masa.version()}: the CMS voucher work alone {per_pass[0]:.0f} us CPU per voucher "
          f"(best of {len(per_pass)} passes over {len(saved['rvrs'])} requests; median "
          f"{per_pass[len(per_pass) // 2]:.0f})")


if __name__ == "__main__":
    main()
