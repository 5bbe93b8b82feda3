"""The SZTP device's checks of signed data (pledge_sim.sztp_verify, RFC 8572 §5.3/§5.4) with
real signatures: a MASA voucher, the owner certificate, the signed conveyed information; each
forgery refused with its own code and reason, in §5.4's order."""

from __future__ import annotations

import datetime
import json

import pytest

from brski import pki, sztp
from brski.signed_voucher import sign_voucher_cms
from brski.voucher import Assertion, Voucher
from pledge_sim.sztp_verify import Refused, accept

NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
NONCE = bytes(range(16))
INFO = sztp.OnboardingInformation(configuration_handling="replace",
                                  configuration=json.dumps({"hostname": "r"}).encode())


@pytest.fixture(scope="module")
def world() -> tuple[pki.TestPki, pki.TestPki]:
    return (pki.create_test_pki(NOW - datetime.timedelta(hours=1), serials=["dev-1"]),
            pki.create_test_pki(NOW - datetime.timedelta(hours=1), domain="Other Domain"))


def voucher(p: pki.TestPki, *, serial: str = "dev-1", nonce: bytes | None = NONCE,
            signer: pki.Issued | None = None) -> bytes:
    from cryptography.hazmat.primitives import serialization
    v = Voucher(assertion=Assertion.LOGGED, created_on=NOW, serial_number=serial, nonce=nonce,
                pinned_domain_cert=p.domain_ca.cert.public_bytes(serialization.Encoding.DER))
    s = signer or p.masa_signer
    return sign_voucher_cms(v, s.key, [s.cert, p.masa_ca.cert], NOW)


def output(p: pki.TestPki, *, ov: bytes | None = None, owner: pki.Issued | None = None,
           signer: pki.Issued | None = None,
           info: sztp.ConveyedInformation = INFO) -> sztp.GetBootstrappingDataOutput:
    owner = owner or p.registrar
    signer = signer or owner
    data = sztp.encode_conveyed(info, "json")
    ci = sztp.sign_conveyed(data, "json", signer.key, [signer.cert], NOW)
    return sztp.GetBootstrappingDataOutput(ci, sztp.degenerate_certs([owner.cert]),
                                           ov or voucher(p))


def check(p: pki.TestPki, out: sztp.GetBootstrappingDataOutput, *, trusted: bool = False,
          nonce: bytes | None = NONCE):  # type: ignore[no-untyped-def]
    return accept(out, trusted=trusted, serial="dev-1", masa_anchors=[p.masa_ca.cert],
                  nonce=nonce, now=NOW)


def test_signed_onboarding_is_accepted(world: tuple) -> None:
    p, _ = world
    got = check(p, output(p))
    assert got.signed and got.information == INFO and got.pinned == p.domain_ca.cert


def test_voucher_for_another_serial(world: tuple) -> None:
    p, _ = world
    with pytest.raises(Refused) as exc:
        check(p, output(p, ov=voucher(p, serial="dev-2")))
    assert exc.value.code == "voucher-serial" and "'dev-2'" in exc.value.reason


def test_stale_nonce(world: tuple) -> None:
    p, _ = world
    with pytest.raises(Refused) as exc:  # a voucher bound to an earlier request's nonce
        check(p, output(p, ov=voucher(p, nonce=bytes(16))))
    assert exc.value.code == "voucher-nonce"
    assert "does not match the one sent" in exc.value.reason


def test_voucher_not_from_the_masa(world: tuple) -> None:
    p, other = world
    with pytest.raises(Refused) as exc:
        check(p, output(p, ov=voucher(p, signer=other.masa_signer)))
    assert exc.value.code == "voucher-signature"


def test_owner_certificate_of_another_domain(world: tuple) -> None:
    p, other = world
    with pytest.raises(Refused) as exc:
        check(p, output(p, owner=other.registrar))
    assert exc.value.code == "owner-certificate"
    assert "pinned-domain-cert" in exc.value.reason


def test_conveyed_information_signed_by_the_wrong_owner(world: tuple) -> None:
    p, other = world
    # the owner certificate chains to the pinned domain, but another key signed the data
    with pytest.raises(Refused) as exc:
        check(p, output(p, signer=other.registrar))
    assert exc.value.code == "owner-signature"
    assert "not signed by the owner certificate" in exc.value.reason


def test_altered_conveyed_information(world: tuple) -> None:
    p, _ = world
    out = output(p)
    tampered = out.conveyed_information.replace(b'"replace"', b'"replacf"')
    assert tampered != out.conveyed_information
    with pytest.raises(Refused) as exc:
        check(p, sztp.GetBootstrappingDataOutput(tampered, out.owner_certificate,
                                                 out.ownership_voucher))
    assert exc.value.code == "owner-signature" and "messageDigest" in exc.value.reason


def test_unsigned_onboarding_only_from_a_trusted_server(world: tuple) -> None:
    p, _ = world
    plain = sztp.GetBootstrappingDataOutput(
        sztp.wrap_unsigned(sztp.encode_conveyed(INFO, "json"), "json"))
    with pytest.raises(Refused) as exc:
        check(p, plain)
    assert exc.value.code == "unsigned-onboarding"
    assert check(p, plain, trusted=True, nonce=None).information == INFO


def test_untrusted_unsigned_redirect_loses_its_trust_anchors(world: tuple) -> None:
    p, _ = world
    ta = sztp.degenerate_certs([p.domain_ca.cert])
    info = sztp.RedirectInformation((sztp.BootstrapServer("fd00::1", 8443, ta),))
    plain = sztp.GetBootstrappingDataOutput(
        sztp.wrap_unsigned(sztp.encode_conveyed(info, "xml"), "xml"))
    got = check(p, plain)
    assert got.information == sztp.RedirectInformation((sztp.BootstrapServer("fd00::1", 8443),))
    assert check(p, plain, trusted=True).information == info  # a trusted one keeps them


def test_signed_conveyed_information_without_voucher(world: tuple) -> None:
    p, _ = world
    out = output(p)
    with pytest.raises(Refused) as exc:
        check(p, sztp.GetBootstrappingDataOutput(out.conveyed_information), trusted=True)
    assert exc.value.code == "no-ownership-voucher"


def test_signed_redirect_keeps_its_trust_anchors(world: tuple) -> None:
    p, _ = world
    ta = sztp.degenerate_certs([p.domain_ca.cert])
    info = sztp.RedirectInformation((sztp.BootstrapServer("fd00::2", 443, ta),))
    got = check(p, output(p, info=info))  # untrusted source, but signed by the owner
    assert got.signed and got.information == info
