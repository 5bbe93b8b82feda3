"""A provisional DTLS client (brski.dtls ``DtlsConfig(provisional=True)``): the pledge before
its voucher accepts the registrar's certificate unverified (RFC 8995 §5.1, cBRSKI §6.3), names
it in its PVR and checks it against the voucher's pin afterwards. The server side is unchanged:
it still verifies the pledge's IDevID."""

import asyncio
import datetime
import os

import aiocoap
import pytest

from brski.dtls import CertificateRefused, DtlsConfig, DtlsServer, DtlsSession
from brski.errors import UsageError
from brski.pki import create_test_pki
from coaps_io.aiocoap_dtls import create_client_context, create_server_context
from pledge_sim.constrained import Proximity, build_cose_pvr, check_registrar_pinned
from pledge_sim.identity import PledgeIdentity
from pledge_sim.voucher_check import VoucherRejected
from registrar.constrained_voucher import check_pledge_request_cose
from tests.test_coaps_io import site_with_big
from tests.test_dtls import handshake

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture(scope="module")
def pki():
    return create_test_pki(NOW, serials=["PV-1"])


@pytest.fixture(scope="module")
def rogue():
    return create_test_pki(NOW, manufacturer="Rogue Manufacturer", domain="Rogue Domain",
                           serials=["R1"])


def server(pki):
    return DtlsServer(DtlsConfig(pki.registrar.cert, pki.registrar.key,
                                 [pki.manufacturer_ca.cert]))


def provisional(pki, serial="PV-1"):
    idevid = pki.idevids[serial]
    return DtlsConfig(idevid.cert, idevid.key, [], provisional=True)


def test_provisional_pledge_completes_with_an_unknown_registrar_and_learns_its_cert(pki):
    client = DtlsSession.client(provisional(pki))
    session, _ = handshake(server(pki), client)
    assert client.peer_certificates[0] == pki.registrar.cert
    assert client.peer_chain == []  # nothing was verified
    # The registrar still authenticated the pledge.
    assert session.peer_certificate == pki.idevids["PV-1"].cert


def test_anchored_pledge_still_refuses_a_registrar_it_cannot_verify(pki, rogue):
    idevid = pki.idevids["PV-1"]
    client = DtlsSession.client(DtlsConfig(idevid.cert, idevid.key, [rogue.domain_ca.cert]))
    with pytest.raises(CertificateRefused):
        handshake(server(pki), client)


def test_registrar_still_refuses_an_unknown_idevid_from_a_provisional_pledge(pki, rogue):
    client = DtlsSession.client(provisional(rogue, "R1"))
    with pytest.raises(CertificateRefused):
        handshake(server(pki), client)


def test_only_a_client_may_be_provisional(pki):
    config = DtlsConfig(pki.registrar.cert, pki.registrar.key, [], provisional=True)
    with pytest.raises(UsageError, match="only a client"):
        DtlsServer(config)
    with pytest.raises(UsageError, match="anchors"):
        DtlsConfig(pki.registrar.cert, pki.registrar.key, [])


def test_provisional_session_feeds_the_pvr_and_the_pin_check(pki, rogue):
    idevid = pki.idevids["PV-1"]
    client = DtlsSession.client(provisional(pki))
    handshake(server(pki), client)
    seen = client.peer_certificates
    me = PledgeIdentity("PV-1", idevid.cert, idevid.key, os.devnull, os.devnull)
    pvr = build_cose_pvr(me, seen[0], os.urandom(16), NOW, Proximity.CERT)
    req = check_pledge_request_cose(pvr, [idevid.cert], pki.registrar.cert,
                                    [pki.manufacturer_ca.cert], NOW)
    assert req.serial == "PV-1"
    check_registrar_pinned(seen, pki.domain_ca.cert, NOW)
    with pytest.raises(VoucherRejected):
        check_registrar_pinned(seen, rogue.domain_ca.cert, NOW)


def test_provisional_aiocoap_client_over_udp(pki):
    async def main():
        site, big = site_with_big()
        config = DtlsConfig(pki.registrar.cert, pki.registrar.key, [pki.manufacturer_ca.cert])
        srv, endpoint = await create_server_context(site, ("::1", 0), config)
        client, _ = await create_client_context(provisional(pki), bind=("::1", 0))
        try:
            port = endpoint.local_address[1]
            response = await client.request(aiocoap.Message(
                code=aiocoap.GET, uri=f"coaps://[::1]:{port}/big")).response
        finally:
            await client.shutdown()
            await srv.shutdown()
        assert response.code == aiocoap.CONTENT and len(response.payload) == 3000
        assert response.remote.peer_certificate == pki.registrar.cert
        assert big.peers == [pki.idevids["PV-1"].cert]

    asyncio.run(asyncio.wait_for(main(), 60))
