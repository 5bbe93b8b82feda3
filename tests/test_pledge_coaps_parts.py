"""Pure parts of ``pledge-sim enroll --transport coaps``: CoRE discovery answers (forged and
malformed ones included), block sizes, how CoAP refusals map to retries, and the CLI's
argument checks. The whole flow runs in tests/test_pledge_coaps_e2e.py."""

from __future__ import annotations

import subprocess
import sys

import aiocoap
import pytest

from pledge_sim.coap_discover import QUERY, candidates_from_answer, request_datagram
from pledge_sim.coaps_runner import BLOCK_SIZES, CoapsPledgeRunner, block_szx
from pledge_sim.discovery import Candidate

TOKEN = b"\x01\x02\x03\x04"


def answer(payload: bytes, *, token: bytes = TOKEN, code=aiocoap.CONTENT) -> bytes:
    msg = aiocoap.Message(code=code, payload=payload, content_format=40)
    msg.mtype, msg.mid, msg.token = aiocoap.NON, 7, token
    return msg.encode()


def test_discovery_request_is_a_non_get_of_well_known_core_with_the_brski_jp_query():
    msg = aiocoap.Message.decode(request_datagram(0x1234, TOKEN))
    assert msg.code == aiocoap.GET and msg.mtype == aiocoap.NON
    assert msg.opt.uri_path == (".well-known", "core") and msg.opt.uri_query == (QUERY,)
    assert msg.token == TOKEN and msg.mid == 0x1234


def test_answer_names_the_join_port_on_its_source_address_with_the_link():
    got = candidates_from_answer(answer(b"<>;brski-jp=5684"), "fe80::b:2%eth0", "eth0", TOKEN)
    assert got == [Candidate("fe80::b:2%eth0", 5684, "coap")]
    got = candidates_from_answer(answer(b"<>;brski-jp=6000"), "fd00::2", "eth0", TOKEN)
    assert got == [Candidate("fd00::2", 6000, "coap")]


@pytest.mark.parametrize("datagram", [
    answer(b"<>;brski-jp=5684", token=b"\x09\x09\x09\x09"),  # not our request's answer
    answer(b"<>;brski-jp=5684", code=aiocoap.NOT_FOUND),
    answer(b"<>;brski-jp=99999"),  # port out of range
    answer(b"<>;brski-jp=5684;var=x"),  # a variant this pledge does not speak
    answer(b"\xff\xfe garbage"),
    answer(b""),
    b"",
    b"\x40",
    bytes(range(256)),
])
def test_forged_or_malformed_answers_name_nothing(datagram):
    assert candidates_from_answer(datagram, "fe80::66%eth0", "eth0", TOKEN) == []


def test_block_sizes_are_the_rfc7959_ones():
    assert [block_szx(s) for s in BLOCK_SIZES] == list(range(7))
    for bad in (0, 8, 100, 2048):
        with pytest.raises(ValueError):
            block_szx(bad)


def _runner() -> CoapsPledgeRunner:
    return CoapsPledgeRunner.__new__(CoapsPledgeRunner)


def test_refusals_map_to_retries():
    runner = _runner()
    busy = aiocoap.Message(code=aiocoap.SERVICE_UNAVAILABLE, max_age=7, payload=b"MASA busy")
    failure = runner._refusal("rv", busy)
    assert failure.wait == 7.0 and not failure.other_proxy
    assert failure.reason == "/rv answered 5.03 Service Unavailable: MASA busy"
    assert failure.code == "coap-5.03"
    denied = runner._refusal("rv", aiocoap.Message(code=aiocoap.FORBIDDEN))
    assert denied.other_proxy and denied.wait is None and denied.reason.endswith("Forbidden")
    broken = runner._refusal("sen", aiocoap.Message(code=aiocoap.INTERNAL_SERVER_ERROR))
    assert not broken.other_proxy and broken.wait is None  # transient: back off


def pledge_sim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pledge_sim.cli", *args],
                          capture_output=True, text=True, timeout=60)


def test_block_size_without_coaps_is_a_usage_error(tmp_path):
    done = pledge_sim("enroll", "--pki", str(tmp_path), "--block-size", "64",
                      "--masa-ca", "/dev/null")
    assert done.returncode == 2
    assert done.stderr.strip() == "pledge-sim: --block-size is for --transport coaps"
    done = pledge_sim("enroll", "--transport", "coaps", "--block-size", "100",
                      "--pki", str(tmp_path))
    assert done.returncode == 2 and "--block-size" in done.stderr
    done = pledge_sim("enroll", "--transport", "coaps", "--discover", "grasp",
                      "--pki", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip() == ("pledge-sim: --discover is for https; coaps pledges use "
                                   "CoRE discovery")


def test_missing_masa_signer_file_is_one_line(tmp_path):
    from lab.brski_services import make_pki

    pki = make_pki(tmp_path / "pki", ["C-1"])
    done = pledge_sim("enroll", "--transport", "coaps", "--pki", str(pki),
                      "--masa-signer", str(tmp_path / "absent.pem"),
                      "--registrar", "[::1]:5684")
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("pledge-sim: ") and "cannot load MASA signer" in line, line


def test_an_unexpected_fault_is_reported_not_raised(tmp_path, monkeypatch):
    import asyncio

    from lab.brski_services import make_pki
    from pledge_sim import coaps_runner
    from pledge_sim.identity import identities_from_pki, load_anchors
    from pledge_sim.runner import Settings

    pki = make_pki(tmp_path / "pki", ["F-1"])

    async def broken(*_args, **_kwargs):
        raise RuntimeError("no sockets today")

    monkeypatch.setattr(coaps_runner, "create_client_context", broken)
    [identity] = identities_from_pki(pki, serials=["F-1"])
    settings = Settings(anchors=load_anchors(pki / "masa/ca.crt"), out_dir=tmp_path / "out",
                        deadline=10)
    result = asyncio.run(CoapsPledgeRunner(identity, [Candidate("::1", 5684, "static")],
                                           settings).run())
    assert not result.ok and result.code == "error" and result.attempts == 1
    assert result.reason == "[::1]:5684: RuntimeError: no sockets today"
