"""Fuzz harnesses for the network-facing handlers (issue 11): the daemon's GRASP handler
refuses only with ``Refused``; the registrar's IPIP packet checks return a drop reason, never
raise; the registrar and the MASA, as real processes over TLS, answer whatever comes with a
4xx refusal, never a 5xx, and log no traceback. Seeds: what real peers send.
"""

from __future__ import annotations

import json
from ipaddress import IPv6Address

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fuzzkit import fuzz_settings, mutated
from hypothesis import given
from hypothesis import strategies as st
from test_registrar import EST, RV, VCJ, Setup, brski_pki
from test_wire_fuzz import FLOOD_SEEDS

from brski import est
from brski.grasp import IPv6Locator, registrar_flood
from joinproxyd.discovery.grasp import Refused, registrars_in_flood
from lab.registrar_testing import call, client_context
from registrar import ipip_packet

LL = IPv6Address("fe80::1")
GRASP_SEEDS = [*FLOOD_SEEDS, registrar_flood(lambda n: bytes(n), LL,
                                             [IPv6Locator(LL, 6, 8443)]).encode()]


@fuzz_settings(300)
@given(st.binary(max_size=200) | mutated(GRASP_SEEDS))
def test_daemon_grasp_handler_refuses_only_with_refused(data):
    try:
        endpoints, ttl = registrars_in_flood(data, 3)
    except Refused:
        return
    assert endpoints and ttl >= 0


def _ipv6_ipip(inner: bytes) -> bytes:
    # an IPv6 header (next header 41) around an inner packet, as the IPIP relay sees it
    return (bytes([0x60, 0, 0, 0]) + len(inner).to_bytes(2, "big") + bytes([41, 64])
            + LL.packed + IPv6Address("fe80::2").packed + inner)


IPIP_SEEDS = [_ipv6_ipip(_ipv6_ipip(b"\x16\x03\x01")), _ipv6_ipip(b"")]


@fuzz_settings(300)
@given(st.binary(max_size=120) | mutated(IPIP_SEEDS))
def test_registrar_ipip_checks_never_raise(packet):
    for check in (ipip_packet.check_inbound, ipip_packet.check_outbound):
        verdict = check(packet, LL)
        assert verdict is None or isinstance(verdict, ipip_packet.Drop)


# --- the registrar and the MASA over TLS --------------------------------------------------------


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-services")
    brski_pki("init", str(root / "pki"), "--serial", "SN-Z")
    setup = Setup(root / "pki", root)
    setup.masa.start()
    setup.registrar.start()
    yield setup
    setup.stop()  # asserts: no traceback in either log


@pytest.fixture(scope="module")
def http_seeds(services) -> dict[str, list[bytes]]:
    pvr = services.pvr("SN-Z")
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    status = json.dumps({"version": 1, "status": False, "reason": "r",
                         "reason-context": {"a": [1, 2.5, None]}}).encode()
    return {"voucher": [pvr], "status": [status], "csr": [est.encode_csr_body(csr)]}


ENDPOINTS = {
    "requestvoucher": (RV, VCJ, "voucher"),
    "voucher_status": ("/.well-known/brski/voucher_status", "application/json", "status"),
    "enrollstatus": ("/.well-known/brski/enrollstatus", "application/json", "status"),
    "simpleenroll": (f"{EST}/simpleenroll", est.MEDIA_PKCS10, "csr"),
    "simplereenroll": (f"{EST}/simplereenroll", est.MEDIA_PKCS10, "csr"),
}


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@fuzz_settings(25)
@given(data=st.data())
def test_registrar_answers_junk_with_4xx(services, http_seeds, endpoint, data):
    path, media, seeds = ENDPOINTS[endpoint]
    body = data.draw(st.binary(max_size=200) | mutated(http_seeds[seeds]))
    answer = services.call("POST", path, serial="SN-Z", body=body, content_type=media)
    assert 200 <= answer.status < 500, (answer.status, answer.text[:300])


@pytest.mark.parametrize("path", ["/.well-known/brski/requestvoucher",
                                  "/.well-known/brski/requestauditlog"])
@fuzz_settings(25)
@given(data=st.data())
def test_masa_answers_junk_with_4xx(services, http_seeds, path, data):
    body = data.draw(st.binary(max_size=200) | mutated(http_seeds["voucher"]))
    ctx = client_context(services.pki / "domain/registrar.crt",
                         services.pki / "domain/registrar.key")
    answer = call("::1", services.masa_port, "POST", path, body=body, content_type=VCJ,
                  ctx=ctx)
    assert 200 <= answer.status < 500, (answer.status, answer.text[:300])
