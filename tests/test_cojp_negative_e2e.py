"""Tampered OSCORE through joinproxyd's cojp mode to the real JRC, in one place.

The JRC-level cases are unit tests already (tests/test_cojp_jrc_units.py:
test_bad_tag_unknown_context_and_unprotected_are_dropped, test_replayed_older_request_is_dropped_
and_counted; tests/test_cojp_jrc_lab.py: a replay across a ``kill -9``); forged proxy tokens are
tests/test_cojp_relay.py's. Here the same forgeries come from a pledge on the join link, through
the proxy (which relays OSCORE unread: it cannot tell), to brski-registrar's JRC:

- a bit-flipped ciphertext (the tag fails), a request under an ID context no pledge in the
  store has, and an older request replayed after a newer one was answered are dropped
  silently (RFC 9031 §7.3.2 / §8.1.1 override RFC 8613 §8.2's error responses: a JRC does not
  help an attacker probe) and counted in brski_registrar_refusals_total{endpoint="cojp"} by
  reason;
- the genuine requests before and after are answered (2.04), so the forgeries did not move
  the replay window; an exact retransmission of the last answered request gets the cached
  answer again (RFC 9031 §7.3.2's lost-response case), not a refusal.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cojp_jrc_lab import cli

from lab import Lab, Topology, wait_for
from lab.proxyd import PYTHON, ProxyDaemon, base_config
from lab.registrar_setup import READY_MARK, write_configs
from tests.test_masa import brski_pki

pytestmark = pytest.mark.netns

REGISTRAR = "fd4a:5044::100"
PLEDGE_ID = "0200000000000abc"
STRANGER = "0200000000000def"  # not in the JRC's store
METRICS_PORT = 9468

# argv: context dir, pledge ID hex, PSK hex, count: writes the context and prints `count`
# protected Join Requests (hex), each under the next sequence number, with Proxy-Scheme and
# Uri-Host added outside OSCORE, as a pledge sends them to a join proxy.
REQUESTS = r"""
import sys
from pathlib import Path
import aiocoap
from brski import cojp as objects
from brski.coap_datagram import CoapDatagram
from pledge_sim import cojp

directory = Path(sys.argv[1])
cojp.write_context(directory, bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3]))
ctx = cojp.load_context(directory)
for n in range(int(sys.argv[4])):
    inner = aiocoap.Message(code=aiocoap.POST, uri_path=("j",),
                            payload=objects.JoinRequest(b"\xca\xfe").encode())
    outer, _ = ctx.protect(inner)
    outer.mtype, outer.mid, outer.token = aiocoap.CON, 0x4200 + n, bytes([n + 1])
    plain = CoapDatagram.decode(outer.encode())
    print(CoapDatagram(plain.mtype, plain.code, plain.message_id, plain.token,
                       (*plain.options, (3, b"6tisch.arpa"), (39, b"coap")),
                       plain.payload).encode().hex())
"""

# argv: proxy port, then hex datagrams; sends each, prints "answer <code>" or "none" per datagram
SEND = r"""
import socket, sys
from brski.coap_datagram import CoapDatagram
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(1.5)
for data in sys.argv[2:]:
    s.sendto(bytes.fromhex(data), ("fe80::1%eth0", int(sys.argv[1])))
    try:
        print("answer", CoapDatagram.decode(s.recv(2048)).code, flush=True)
    except TimeoutError:
        print("none", flush=True)
"""


@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=1), log_dir=tmp_path / "logs") as lab:
        yield lab


def requests(tmp_path: Path, name: str, pledge_id: str, psk: str, count: int) -> list[str]:
    done = subprocess.run([sys.executable, "-c", REQUESTS, str(tmp_path / name), pledge_id, psk,
                           str(count)], capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.split()


def test_tampered_oscore_through_the_proxy_is_dropped_and_counted(lab: Lab,
                                                                  tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    brski_pki("init", str(pki), "--serial", "SN-N")
    registrar_toml, _ = write_configs(
        pki, tmp_path / "svc", masa_listen=["[::1]:9443"],
        registrar_listen=[f"[{REGISTRAR}]:8443"], masa_timeout=5, mdns=False, grasp=False)
    with registrar_toml.open("a") as toml:
        toml.write('\n[cojp]\nenabled = true\nnetwork_id = "cafe"\n')
    added = cli("add-pledge", "--config", str(registrar_toml), "--id", PLEDGE_ID,
                "--generate-psk")
    assert added.returncode == 0, added.stderr
    psk = added.stdout.split("psk ")[1].split()[0]
    first, second, third = requests(tmp_path, "pledge", PLEDGE_ID, psk, 3)
    [stranger] = requests(tmp_path, "stranger", STRANGER, psk, 1)
    flipped = bytearray.fromhex(second)
    flipped[-1] ^= 1  # the last byte of the AEAD tag

    host = lab.registrars[0]
    registrar = host.spawn([PYTHON, "-m", "registrar.cli", "--config", str(registrar_toml),
                            "--metrics", f"[::1]:{METRICS_PORT}"], name="registrar")
    wait_for(lambda: READY_MARK in registrar.log(), 30, "the registrar")
    config = base_config(tmp_path / "proxy", join=[{"interfaces": ["join*"], "modes": ["cojp"]}],
                         registrars={"discovery": ["static"], "static": [
                             {"address": REGISTRAR, "port": 8443, "cojp_port": 5683}]})
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config).start()
    wait_for(lambda: daemon.ctl()["joining_modes"]["cojp"]["open"], 15, "cojp joining")

    sent = [first, flipped.hex(), stranger, second, first, third, third]
    done = lab.pledges[0].run([PYTHON, "-c", SEND, "5683", *sent], timeout=60)
    assert done.stdout.split("\n")[:-1] == [
        "answer 68",  # genuine: 2.04 Changed
        "none",       # bad tag: dropped
        "none",       # unknown ID context: dropped
        "answer 68",  # genuine, after the forgeries: the window did not move
        "none",       # the first again, older than the one answered: a replay
        "answer 68",  # genuine
        "answer 68",  # its exact retransmission: the cached answer
    ], done.stdout

    def refused(reason: str) -> float:
        text = host.run(["curl", "-sf", f"http://[::1]:{METRICS_PORT}/metrics"]).stdout
        m = re.search(rf'^brski_registrar_refusals_total\{{endpoint="cojp",reason="{reason}"\}}'
                      r" (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    assert (refused("bad-tag"), refused("unknown-id-context"), refused("replay")) == (1, 1, 1)
    log = registrar.log()
    assert "refused (bad-tag)" in log and "refused (replay)" in log
    assert f"pledge {STRANGER} is not in the store" in log
    # The proxy relayed all seven (it cannot read OSCORE) and refused none.
    counters = wait_for(lambda: (c := daemon.relay_counters("cojp")).datagrams_up >= 7 and c,
                        5, "the cojp counters", interval=0.3)
    assert counters.datagrams_up == 7 and counters.datagrams_down == 4, counters
    assert not counters.drops, counters
    listing = cli("list", "--config", str(registrar_toml))
    assert " joins 3 " in listing.stdout, listing.stdout  # the retransmission is no new join
    daemon.stop()
    registrar.stop()
    assert "Traceback" not in registrar.log() + daemon.log()
