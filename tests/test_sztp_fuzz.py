"""Fuzzing the SZTP and DHCPv6 decoders (brski/sztp.py, brski/dhcpv6.py) and the device's
checks (pledge_sim/sztp_verify.py): whatever the bytes, only ProtocolError (decoders) or
Refused (device) comes out, and what decodes re-encodes to the same value."""

from __future__ import annotations

import datetime

from fuzzkit import decoded_or_none, fuzz_settings, mutated
from hypothesis import given
from hypothesis import strategies as st

from brski import dhcpv6, pki, sztp
from pledge_sim.sztp_verify import Refused, accept

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
_PKI = pki.create_test_pki(NOW, serials=["f-1"])
_INFO = sztp.OnboardingInformation(
    boot_image=sztp.BootImage("OS", "2", ("https://x/y",), bytes(32)),
    configuration_handling="merge", configuration=b"cfg", post_configuration_script=b"s")
_REDIRECT = sztp.RedirectInformation((sztp.BootstrapServer("fd00::1", 8443, b"\x30\x00"),))
SEEDS = {enc: [sztp.encode_conveyed(_INFO, enc), sztp.encode_conveyed(_REDIRECT, enc),
               sztp.GetBootstrappingDataInput(True, "m", "o", "v", bytes(16)).encode(enc),
               sztp.ReportProgressInput("bootstrap-complete", "m", (b"t",)).encode(enc),
               sztp.GetBootstrappingDataOutput(b"c", b"o", b"v", "verbose").encode(enc)]
         for enc in ("json", "xml")}
CMS_SEEDS = [sztp.wrap_unsigned(SEEDS["json"][0], "json"),
             sztp.sign_conveyed(SEEDS["json"][0], "json", _PKI.registrar.key,
                                [_PKI.registrar.cert], NOW),
             sztp.degenerate_certs([_PKI.domain_ca.cert])]
DHCP_SEEDS = [b"\x07\x00\x00\x01" + (136).to_bytes(2, "big") + b"\x00\x0c"
              + sztp.encode_dhcpv6_uris(["https://x"])]
DECODERS = (sztp.decode_conveyed, sztp.GetBootstrappingDataInput.decode,
            sztp.ReportProgressInput.decode, sztp.GetBootstrappingDataOutput.decode)


@fuzz_settings(300)
@given(st.sampled_from(["json", "xml"]).flatmap(
    lambda enc: st.tuples(st.just(enc), mutated(SEEDS[enc]) | st.binary(max_size=200))))
def test_yang_data_decoders_raise_only_protocol_errors(case: tuple[str, bytes]) -> None:
    encoding, data = case
    for decode in DECODERS:
        value = decoded_or_none(decode, data, encoding)
        if value is None:
            continue
        again = value.encode(encoding) if hasattr(value, "encode") \
            else sztp.encode_conveyed(value, encoding)
        assert decode(again, encoding) == value


@fuzz_settings(300)
@given(mutated(CMS_SEEDS) | st.binary(max_size=300))
def test_cms_decoders_raise_only_protocol_errors(data: bytes) -> None:
    decoded_or_none(sztp.unwrap_conveyed, data)
    decoded_or_none(sztp.parse_degenerate, data, "owner-certificate")


@fuzz_settings(200)
@given(mutated(CMS_SEEDS))
def test_the_device_refuses_anything_forged(data: bytes) -> None:
    out = sztp.GetBootstrappingDataOutput(data, CMS_SEEDS[2], data)
    try:
        accept(out, trusted=False, serial="f-1", masa_anchors=[_PKI.masa_ca.cert],
               nonce=bytes(16), now=NOW)
    except Refused:
        return
    raise AssertionError("a mutated voucher was accepted")


@fuzz_settings(300)
@given(mutated(DHCP_SEEDS) | st.binary(max_size=100))
def test_dhcpv6_decoders_raise_only_protocol_errors(data: bytes) -> None:
    options = decoded_or_none(dhcpv6.parse_reply, data, 1)
    if options and 136 in options:
        decoded_or_none(sztp.decode_dhcpv6_uris, options[136][0])
    decoded_or_none(sztp.decode_dhcpv6_uris, data)
