"""Fuzz the COSE voucher-request paths in process (issue 13 item 3): whatever bytes come, the
MASA's ``authenticate_cose`` and the registrar's ``check_pledge_request_cose`` refuse with a
``Refusal`` (a 4xx), never another exception (a 500), and the log helper never raises."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from fuzzkit import fuzz_settings, mutated
from hypothesis import given
from hypothesis import strategies as st

from brski import certs, cose
from brski.pki import create_test_pki
from brski.signed_voucher import sign_voucher_cose
from brski.voucher import Assertion, VoucherRequest, decode_cbor
from lab.masa_inprocess import in_process_masa
from registrar.constrained_voucher import check_pledge_request_cose, sign_rvr_cose
from registrar.masa import Masa
from registrar.masa_app import claimed_identity_cose
from registrar.voucher_request import PledgeRequest
from registrar.web import Refusal

NOW = datetime.datetime.now(datetime.UTC)
PKI = create_test_pki(NOW, serials=["SN-F"])
IDEVID = PKI.idevids["SN-F"]


def _pvr() -> bytes:
    request = VoucherRequest(assertion=Assertion.PROXIMITY, created_on=NOW, serial_number="SN-F",
                             nonce=os.urandom(8),
                             proximity_registrar_pubk=certs.spki_der(PKI.registrar.cert))
    return sign_voucher_cose(request, IDEVID.key)


PVR = _pvr()
RVR = sign_rvr_cose(
    PledgeRequest(decode_cbor(cose.decode(PVR).payload, VoucherRequest), PVR, IDEVID.cert,
                  "SN-F"),
    PKI.registrar.key, [PKI.registrar.cert, PKI.domain_ca.cert], [IDEVID.cert], NOW)


def _masa(tmp: str) -> Masa:
    return in_process_masa(PKI, Path(tmp), log_level=20)


def test_seed_is_accepted(tmp_path):
    assert _masa(str(tmp_path)).authenticate_cose(RVR, NOW).serial == "SN-F"


@fuzz_settings(300)
@given(data=st.binary(max_size=200) | mutated([RVR, PVR]))
def test_masa_cose_refuses_only_with_refusal(tmp_path_factory, data):
    masa = _masa(str(tmp_path_factory.mktemp("fuzz")))
    claimed_identity_cose(data)  # must not raise either
    try:
        masa.authenticate_cose(data, NOW)
    except Refusal as refusal:
        assert 400 <= refusal.status < 500


@fuzz_settings(300)
@given(data=st.binary(max_size=200) | mutated([PVR]))
def test_registrar_cose_pvr_check_refuses_only_with_refusal(data):
    try:
        check_pledge_request_cose(data, [IDEVID.cert], PKI.registrar.cert,
                                  [PKI.manufacturer_ca.cert], NOW)
    except Refusal as refusal:
        assert 400 <= refusal.status < 500
