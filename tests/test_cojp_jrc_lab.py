"""The CoJP JRC in the real brski-registrar process, a pledge in its own namespace.

Pledges sit on the registrar's link (link-local only; RFC 9031 lets a pledge talk to the JRC
directly) and join with a PSK that ``brski-registrar cojp add-pledge --generate-psk`` put in the
store. The pledge is aiocoap's client with its own OSCORE context (pledge_sim.cojp). Then the
registrar is killed with SIGKILL, restarted, and the pledge joins again: the JRC's Partial IVs
seen on the wire never repeat, an old request is refused as a replay, counted in /metrics.
aiocoap-client, with an OSCORE credentials file, joins as another pledge.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from brski import cojp
from lab import Lab, Topology, wait_for
from lab.proxyd import PYTHON
from lab.registrar_setup import READY_MARK, write_configs
from tests.test_masa import brski_pki

PLEDGE_ID = "00-12-4b-00-14-b5-d9-e2"
METRICS_PORT = 9467
JRC_LL = "fe80::b:2"  # registrar0's link-local address on the backbone

# Joins N times (argv: context dir, JRC target, N, hex of a raw request to replay first or "-")
# and prints one JSON line per join; the pledge's own request bytes are printed too.
PLEDGE = r"""
import asyncio, json, socket, sys
from pathlib import Path
import aiocoap
from pledge_sim import cojp

async def main(directory, target, count, replay):
    ctx = cojp.load_context(Path(directory))
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        if replay != "-":
            host, port = target.rsplit(":", 1)
            addr = socket.getaddrinfo(host.strip("[]"), int(port), socket.AF_INET6,
                                      socket.SOCK_DGRAM)[0][4]
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                s.sendto(bytes.fromhex(replay), addr)
                try:
                    s.recvfrom(2048)
                    print(json.dumps({"replay": "answered"}))
                except TimeoutError:
                    print(json.dumps({"replay": "dropped"}))
        for _ in range(count):
            result = await cojp.join(client, ctx, target, b"\xca\xfe", timeout=20)
            print(json.dumps({
                "request_piv": result.request_piv.hex(),
                "response_piv": None if result.response_piv is None else result.response_piv.hex(),
                "short_id": result.configuration.short_identifier.identifier.hex(),
                "jrc_address": (result.configuration.jrc_address or b"").hex(),
            }), flush=True)
    finally:
        await client.shutdown()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
"""

# A raw, protected Join Request for the replay check: the pledge's context makes it, the JRC
# will already have seen it (printed as hex, sent later from a plain socket).
RAW_REQUEST = r"""
import sys
from pathlib import Path
import aiocoap
from brski import cojp as objects
from pledge_sim import cojp

ctx = cojp.load_context(Path(sys.argv[1]))
inner = aiocoap.Message(code=aiocoap.POST, uri_path=("j",),
                        payload=objects.JoinRequest(b"\xca\xfe").encode())
outer, _ = ctx.protect(inner)
outer.mtype, outer.mid, outer.token = aiocoap.NON, 0x4242, b"\x42"
print(outer.encode().hex())
"""

METRIC = """
import re, sys, urllib.request
text = urllib.request.urlopen("http://[::1]:%d/metrics" % int(sys.argv[1]), timeout=5).read()
m = re.search(rb'^' + re.escape(sys.argv[2].encode()) + rb' (\\S+)$', text, re.M)
print(float(m.group(1)) if m else 0.0)
"""


@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=1, pledges_on_backbone=True), log_dir=tmp_path / "logs") as lab:
        yield lab


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "registrar.cli", "cojp", *args],
                          capture_output=True, text=True, timeout=60)


def test_pledge_joins_and_jrc_nonces_survive_kill_9(lab: Lab, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    brski_pki("init", str(pki), "--serial", "SN-C")
    registrar_toml, _ = write_configs(
        pki, tmp_path / "svc", masa_listen=["[::1]:9443"],
        registrar_listen=["[fd4a:5044::100]:8443"], masa_timeout=5, mdns=False, grasp=False)
    with registrar_toml.open("a") as toml:
        toml.write('\n[cojp]\nenabled = true\nlisten = "[::]:5683"\nnetwork_id = "cafe"\n'
                   'jrc_address = "fd4a:5044::100"\n'
                   '[[cojp.link_layer_key]]\nkey_id = 1\n'
                   'key = "e6bf4287c2d7618d6a9687445ffd33e6"\n')

    added = cli("add-pledge", "--config", str(registrar_toml), "--id", PLEDGE_ID,
                "--generate-psk")
    assert added.returncode == 0, added.stderr
    psk = added.stdout.split("psk ")[1].split()[0]
    again = cli("add-pledge", "--config", str(registrar_toml), "--id", PLEDGE_ID, "--psk", psk)
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert "already known" in again.stderr
    bad = cli("add-pledge", "--config", str(registrar_toml), "--id", PLEDGE_ID, "--psk", "00")
    assert bad.returncode == 2 and "16 to 64" in bad.stderr

    context = tmp_path / "pledge-ctx"
    subprocess.run([sys.executable, "-c",
                    "import sys; from pathlib import Path; from pledge_sim import cojp; "
                    "cojp.write_context(Path(sys.argv[1]), bytes.fromhex(sys.argv[2]), "
                    "bytes.fromhex(sys.argv[3]))",
                    str(context), PLEDGE_ID.replace("-", ""), psk], check=True)

    host = lab.registrars[0]
    argv = [PYTHON, "-m", "registrar.cli", "--config", str(registrar_toml),
            "--metrics", f"[::1]:{METRICS_PORT}"]
    registrar = host.spawn(argv, name="registrar")
    wait_for(lambda: READY_MARK in registrar.log(), 30, "the registrar")
    assert "CoJP JRC (RFC 9031, OSCORE) on udp [::]:5683" in registrar.log()

    pledge = lab.pledges[0]
    target = f"[{JRC_LL}%eth0]:5683"

    def joins(count: int, replay: str = "-") -> list[dict]:
        done = pledge.run([PYTHON, "-c", PLEDGE, str(context), target, str(count), replay],
                          timeout=120)
        return [json.loads(line) for line in done.stdout.splitlines()]

    capture = tmp_path / "jrc.pcap"
    sniffer = pledge.spawn(["tcpdump", "-i", "eth0", "-n", "-U", "--immediate-mode", "-c", "3",
                            "-w", str(capture), "udp src port 5683"], name="tcpdump")
    wait_for(lambda: "listening on" in sniffer.log(), 10, "tcpdump")
    first = joins(3)
    sniffer.popen.wait(10)  # -c 3: it exits after the three Join Responses
    read = subprocess.run(["tcpdump", "-r", str(capture), "-n", "-v"], capture_output=True,
                          text=True, timeout=30)
    classes = re.findall(r"class 0x([0-9a-f]+)", read.stdout)
    assert len(classes) == 3 and set(classes) == {"90"}, (read.stdout, read.stderr)
    assert [j["short_id"] for j in first] == ["0001"] * 3
    assert first[0]["jrc_address"] == "fd4a5044000000000000000000000100"
    stale = subprocess.run([sys.executable, "-c", RAW_REQUEST, str(context)], check=True,
                           capture_output=True, text=True).stdout.strip()
    # `stale` reaches the JRC once (answered), then a newer request moves the cached one on.
    assert joins(1, replay=stale)[0] == {"replay": "answered"}
    registrar.signal(signal.SIGKILL)
    registrar.popen.wait(10)

    registrar = host.spawn(argv, name="registrar-restarted")
    wait_for(lambda: READY_MARK in registrar.log(), 30, "the restarted registrar")
    after = joins(3, replay=stale)
    assert after[0] == {"replay": "dropped"}
    after = after[1:]

    jrc_pivs = [int(j["response_piv"], 16) for j in [*first, *after]]
    pledge_pivs = [int(j["request_piv"], 16) for j in [*first, *after]]
    assert len(set(jrc_pivs)) == len(jrc_pivs), f"JRC Partial IV reused: {jrc_pivs}"
    assert min(jrc_pivs[3:]) > max(jrc_pivs[:3])
    assert len(set(pledge_pivs)) == len(pledge_pivs)

    def metric(name: str) -> float:
        done = host.run([PYTHON, "-c", METRIC, str(METRICS_PORT), name])
        return float(done.stdout.strip())

    assert metric('brski_registrar_refusals_total{endpoint="cojp",reason="replay"}') == 1.0
    assert metric('brski_registrar_cojp_joins_total{method="psk"}') == 3.0  # since the restart
    assert "refused (replay)" in registrar.log()
    listing = cli("list", "--config", str(registrar_toml))
    assert listing.returncode == 0 and " joins 8 " in listing.stdout, listing.stdout

    # An independent client: aiocoap-client with an OSCORE credentials file, another pledge.
    other = "00-12-4b-00-14-b5-d9-e3"
    added = cli("add-pledge", "--config", str(registrar_toml), "--id", other, "--generate-psk")
    assert added.returncode == 0, added.stderr
    other_ctx = tmp_path / "aiocoap-client-ctx"
    subprocess.run([sys.executable, "-c",
                    "import sys; from pathlib import Path; from pledge_sim import cojp; "
                    "cojp.write_context(Path(sys.argv[1]), bytes.fromhex(sys.argv[2]), "
                    "bytes.fromhex(sys.argv[3]))", str(other_ctx), other.replace("-", ""),
                    added.stdout.split("psk ")[1].split()[0]], check=True)
    url = f"coap://[{JRC_LL}%eth0]:5683"
    credentials = tmp_path / "credentials.json"
    credentials.write_text(json.dumps({f"{url}/*": {"oscore": {"basedir": f"{other_ctx}/"}}}))
    payload = tmp_path / "join-request.cbor"
    payload.write_bytes(bytes.fromhex("a10542cafe"))  # RFC 9031 App. A's Join_Request
    client = str(Path(sys.executable).parent / "aiocoap-client")
    done = pledge.run(["sh", "-c", f"{client} --credentials {credentials} -m POST "
                       f"--payload @{payload} '{url}/j' | od -An -tx1"], timeout=60)
    answer = bytes.fromhex(done.stdout.replace(" ", "").replace("\n", ""))
    conf = cojp.decode_configuration(answer)
    assert conf.short_identifier == cojp.ShortIdentifier(b"\x00\x02"), done
    assert conf.jrc_address == bytes.fromhex("fd4a5044000000000000000000000100")
    assert "pledge 00124b0014b5d9e3 joined" in registrar.log()
    registrar.stop()


@dataclass
class Fleet:
    registrar_toml: Path
    pledges_file: Path  # 20 PSK pledges, then 20 EDHOC pledges
    edhoc_keys: Path
    jrc_credential: Path


def make_fleet(tmp_path: Path) -> Fleet:
    """A registrar configuration with a JRC, and 20 PSK and 20 EDHOC pledges added to its store
    by the operator commands."""
    pki = tmp_path / "pki"
    brski_pki("init", str(pki), "--serial", "SN-F")
    registrar_toml, _ = write_configs(
        pki, tmp_path / "svc", masa_listen=["[::1]:9443"],
        registrar_listen=["[fd4a:5044::100]:8443"], masa_timeout=5, mdns=False, grasp=False)
    made = cli("make-edhoc-credential", "--out", str(tmp_path / "jrc"), "--kid", "4a",
               "--subject", "jrc")
    assert made.returncode == 0, made.stderr
    with registrar_toml.open("a") as toml:
        toml.write('\n[cojp]\nenabled = true\nnetwork_id = "cafe"\nshort_id_lease = 12\n'
                   f'edhoc_private_key = "{tmp_path / "jrc.key"}"\n'
                   f'edhoc_credential = "{tmp_path / "jrc.ccs"}"\n')
    keys = tmp_path / "edhoc"
    keys.mkdir()
    lines = []
    for n in range(40):
        pledge_id = f"02-00-00-00-00-00-00-{n:02x}"
        if n < 20:
            added = cli("add-pledge", "--config", str(registrar_toml), "--id", pledge_id,
                        "--generate-psk")
            assert added.returncode == 0, added.stderr
            lines.append(f"{pledge_id} {added.stdout.split('psk ')[1].split()[0]}")
            continue
        prefix = keys / pledge_id.replace("-", "")
        made = cli("make-edhoc-credential", "--out", str(prefix), "--kid", f"{n:02x}00")
        assert made.returncode == 0, made.stderr
        added = cli("add-pledge", "--config", str(registrar_toml), "--id", pledge_id,
                    "--edhoc-credential", f"{prefix}.ccs")
        assert added.returncode == 0, added.stderr
        lines.append(f"{pledge_id} edhoc")
    pledges_file = tmp_path / "pledges.txt"
    pledges_file.write_text("# id psk\n" + "\n".join(lines) + "\n")
    return Fleet(registrar_toml, pledges_file, keys, tmp_path / "jrc.ccs")


def test_pledge_sim_cojp_fleet(lab: Lab, tmp_path: Path) -> None:
    """20 PSK pledges and 20 EDHOC pledges, added by the operator commands, join with
    ``pledge-sim cojp`` (10 at a time); a second run carries each PSK pledge's sequence number
    on (its OSCORE state persists) and runs EDHOC again for the others."""
    f = make_fleet(tmp_path)
    registrar_toml, pledges_file, keys = f.registrar_toml, f.pledges_file, f.edhoc_keys
    registrar = lab.registrars[0].spawn(
        [PYTHON, "-m", "registrar.cli", "--config", str(registrar_toml)], name="registrar")
    wait_for(lambda: READY_MARK in registrar.log(), 30, "the registrar")

    def fleet() -> dict:
        done = lab.pledges[0].run(
            [PYTHON, "-m", "pledge_sim.cli", "cojp", "--jrc", f"[{JRC_LL}%eth0]:5683",
             "--pledges", str(pledges_file), "--count", "40", "--concurrency", "10",
             "--state", str(tmp_path / "state"), "--edhoc-dir", str(keys),
             "--jrc-credential", str(tmp_path / "jrc.ccs"), "--json"], check=False, timeout=240)
        assert done.returncode == 0, (done.stdout[-3000:], done.stderr)
        return json.loads(done.stdout)

    first = fleet()
    assert first["joined"] == 40 and first["failed"] == 0
    short_ids = {r["short_id"] for r in first["results"]}
    assert len(short_ids) == 40 and "fffe" not in short_ids
    second = fleet()
    assert second["joined"] == 40
    for before, after in zip(first["results"][:20], second["results"][:20], strict=True):
        assert before["pledge_id"] == after["pledge_id"]
        assert int(after["request_piv"], 16) > int(before["request_piv"], 16)
        assert after["short_id"] == before["short_id"]
    log = registrar.log()
    assert log.count("joined (network cafe, role node, psk)") == 40
    assert log.count("joined (network cafe, role node, edhoc)") == 40
    listing = cli("list", "--config", str(registrar_toml)).stdout
    assert listing.count("joins 2 ") == 40 and listing.count("keys edhoc ") == 20

    # A bad pledges file: one line naming the file and line, exit 2.
    bad = tmp_path / "bad.txt"
    bad.write_text("0011 00\n")
    done = subprocess.run([sys.executable, "-m", "pledge_sim.cli", "cojp", "--jrc", "[::1]:5683",
                           "--pledges", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and f"{bad}:1:" in done.stderr
    assert done.stderr.count("\n") == 1
    registrar.stop()
