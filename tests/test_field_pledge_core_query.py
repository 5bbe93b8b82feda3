"""pledge-sim's ``--core-query``: a constrained pledge asks CoRE discovery either in the current
form (``?brski-jp=*``, answered ``<>;brski-jp=PORT``) or as pledges of older drafts do
(``?rt=brski.jp``, answered ``<coaps://[fe80::1]:PORT>;rt=brski.jp``). The legacy answer
names a link-local address without a zone; the candidate must carry the zone of the link the
answer came from, or the pledge cannot reach it. Enrollment through joinproxyd with either
query is in tests/test_constrained_proxy_e2e.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiocoap
import pytest

from pledge_sim.coap_discover import QUERIES, candidates_from_answer, request_datagram
from pledge_sim.discovery import Candidate

TOKEN = b"\x0a\x0b\x0c\x0d"


def answer(payload: bytes) -> bytes:
    msg = aiocoap.Message(code=aiocoap.CONTENT, payload=payload, content_format=40)
    msg.mtype, msg.mid, msg.token = aiocoap.NON, 9, TOKEN
    return msg.encode()


@pytest.mark.parametrize(("name", "query"), [("brski-jp", "brski-jp=*"),
                                             ("rt", "rt=brski.jp")])
def test_the_request_carries_the_chosen_query(name: str, query: str) -> None:
    msg = aiocoap.Message.decode(request_datagram(7, TOKEN, QUERIES[name]))
    assert msg.opt.uri_path == (".well-known", "core") and msg.opt.uri_query == (query,)
    assert msg.mtype == aiocoap.NON and msg.code == aiocoap.GET


def test_a_legacy_link_local_answer_gets_the_zone_of_its_link() -> None:
    got = candidates_from_answer(answer(b"<coaps://[fe80::1]:5684>;rt=brski.jp"),
                                 "fe80::1", "join0", TOKEN)
    assert got == [Candidate("fe80::1%join0", 5684, "coap")]
    # another address on that link, as the legacy form allows
    got = candidates_from_answer(answer(b"<coaps://[fe80::7]:5690>;rt=brski.jp"),
                                 "fe80::1", "join0", TOKEN)
    assert got == [Candidate("fe80::7%join0", 5690, "coap")]
    # a routable address needs no zone
    got = candidates_from_answer(answer(b"<coaps://[fd00::7]:5690>;rt=brski.jp"),
                                 "fe80::1", "join0", TOKEN)
    assert got == [Candidate("fd00::7", 5690, "coap")]


def pledge_sim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pledge_sim.cli", *args],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("args", "line"), [
    (("--core-query", "rt"), "pledge-sim: --core-query is for --transport coaps"),
    (("--transport", "coaps", "--core-query", "rt", "--registrar", "[::1]:5684"),
     "pledge-sim: --core-query is for CoRE discovery, which --registrar skips"),
])
def test_core_query_misuse_is_one_line_and_exit_2(tmp_path: Path, args: tuple[str, ...],
                                                  line: str) -> None:
    done = pledge_sim("enroll", "--pki", str(tmp_path), "--masa-ca", "/dev/null", *args)
    assert done.returncode == 2 and done.stderr.strip() == line, done.stderr


def test_an_unknown_query_is_refused_by_the_parser(tmp_path: Path) -> None:
    done = pledge_sim("enroll", "--pki", str(tmp_path), "--transport", "coaps",
                      "--core-query", "rt=brski", "--masa-ca", "/dev/null")
    assert done.returncode == 2 and "invalid choice: 'rt=brski'" in done.stderr
