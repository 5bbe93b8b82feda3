"""Constrained relays (coaps, jpy) through the real daemon, in namespaces: what status and
/metrics say, and when joining is open (issue 14 item 5 and the daemon side around it).

The registrar stand-in offers only CoAPS and JPY (no HTTPS at all): it answers the daemon's
DTLS probe with a HelloVerifyRequest on each port and echoes everything else (coaps) or
answers [same header, b"echo:" + content] (jpy). So joining must open for the constrained
links without any TCP registrar, the counters in `joinproxyctl status` and /metrics must move
by the exact amounts the pledges cause, and when the stand-in goes away the CoRE join-port
answers must stop and status must say why.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from joinproxyd import config as config_mod
from lab import Host, Lab, LabProcess, Topology, wait_for
from lab.proxyd import PYTHON, ProxyDaemon, base_config

pytestmark = pytest.mark.netns

REGISTRAR = "fd4a:5044::100"
COAPS_PORT = 5684
JPY_PORT = 5685
COAPS_JOIN = 5684  # join0: coaps
JPY_JOIN = 5686  # join1: jpy (another port, so the guard's port list shows both)
COAP_CLIENT = shutil.which("coap-client-openssl")

# Answers a DTLS ClientHello with a HelloVerifyRequest (all the daemon's probe needs), echoes
# on the CoAPS port, and on the JPY port answers [header, b"echo:" + content]. Commands from a
# jpy pledge: FORGE sends one reply with a made-up header, one with a stale key id and one
# exact replay of an earlier reply; LATE answers under the first header it ever saw.
STAND_IN = r"""
import os, selectors, socket, struct, sys
import cbor2

def hello_verify():
    body = b"\xfe\xff\x01X"  # server_version, cookie length 1, cookie
    handshake = bytes([3]) + len(body).to_bytes(3, "big") + b"\0\0" + b"\0\0\0" \
        + len(body).to_bytes(3, "big") + body
    return b"\x16\xfe\xfd" + b"\0" * 8 + struct.pack("!H", len(handshake)) + handshake

def is_hello(data):
    return len(data) > 13 and data[0] == 22 and data[13] == 1

coaps = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
coaps.bind(("::", int(sys.argv[1])))
jpy = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
jpy.bind(("::", int(sys.argv[2])))
sel = selectors.DefaultSelector()
sel.register(coaps, selectors.EVENT_READ)
sel.register(jpy, selectors.EVENT_READ)
first = None
sent = []
late = 0
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        sock = key.fileobj
        data, peer = sock.recvfrom(65535)
        if sock is coaps:
            sock.sendto(hello_verify() if is_hello(data) else data, peer)
            continue
        header, content = cbor2.loads(data)[:2]
        if is_hello(content):
            sock.sendto(cbor2.dumps([header, hello_verify()]), peer)
            continue
        print("header", header.hex(), content[:8], flush=True)
        if first is None:
            first = header
        if content == b"FORGE":
            made_up = bytes([header[0]]) + os.urandom(len(header) - 1)
            stale = bytes([(header[0] + 128) & 0xFF]) + header[1:]
            for forged in (cbor2.dumps([made_up, b"SECRET"]),
                           cbor2.dumps([stale, b"SECRET"]), sent[0]):
                sock.sendto(forged, peer)
            continue
        if content == b"LATE":
            late += 1
            sock.sendto(cbor2.dumps([first, b"late-%d" % late]), peer)
            print("late", late, flush=True)
            continue
        reply = cbor2.dumps([header, b"echo:" + content])
        sent.append(reply)
        sock.sendto(reply, peer)
"""

# One pledge socket: each argument is a payload to send (and an answer to wait for, printed
# as "reply ..." or "none"); "@NAME" instead waits until the file NAME exists.
PLEDGE = r"""
import os, socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
target = ("fe80::1%eth0", int(sys.argv[1]))
wait = float(sys.argv[2])
for arg in sys.argv[3:]:
    if arg.startswith("@"):
        while not os.path.exists(arg[1:]):
            time.sleep(0.02)
        continue
    payload = b"B" * int(arg[4:]) if arg.startswith("big:") else arg.encode()
    s.sendto(payload, target)
    s.settimeout(wait)
    try:
        print("reply", s.recv(4096).decode(errors="replace"), flush=True)
    except TimeoutError:
        print("none", flush=True)
print("done", flush=True)
"""


@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=4, join_links=2), log_dir=tmp_path / "logs") as lab:
        yield lab


def constrained_config(run_dir: Path, **sections: dict) -> dict:
    # No HTTPS: the registrar's TCP port is given (the static table wants one) but nothing
    # listens there, so its TCP health probe fails for the whole test.
    return base_config(
        run_dir,
        join=[{"interfaces": ["join0"], "modes": ["coaps"], "port": COAPS_JOIN},
              {"interfaces": ["join1"], "modes": ["jpy"], "port": JPY_JOIN}],
        registrars={"discovery": ["static"],
                    "static": [{"address": REGISTRAR, "port": 8443, "preference": 10,
                                "coaps_port": COAPS_PORT, "jpy_port": JPY_PORT}],
                    "health_interval": 0.3, "health_timeout": 0.3},
        **sections)


def stand_in(lab: Lab) -> LabProcess:
    proc = lab.registrars[0].spawn([PYTHON, "-c", STAND_IN, str(COAPS_PORT), str(JPY_PORT)],
                                   name="udp-registrar")
    wait_for(lambda: "ready" in proc.log(), 10, "the stand-in registrar")
    return proc


def pledge(host: Host, port: int, *args: str, wait: float = 1.5) -> list[str]:
    done = host.run([PYTHON, "-c", PLEDGE, str(port), str(wait), *args], timeout=60)
    lines = done.stdout.splitlines()
    assert lines[-1] == "done", done.stdout
    return lines[:-1]


def traffic(daemon: ProxyDaemon, mode: str) -> dict:
    return daemon.ctl()["traffic"].get(mode, {"drops": {}})


def libcoap(host: Host, uri: str) -> str:
    done = host.run(["coap-client-openssl", "-N", "-v", "3", "-m", "get", "-B", "2", uri],
                    timeout=30, check=False)
    return done.stdout + done.stderr


def promtool_check(daemon: ProxyDaemon) -> None:
    listen = daemon.config["metrics"]["listen"]
    text = daemon.host.run(["curl", "-sf", f"http://{listen}/metrics"]).stdout
    done = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                          capture_output=True, timeout=30, check=False)
    # promtool exits 0 when the exposition is valid; lint hints (none expected) go to stdout
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "" and done.stderr.strip() == "", done.stdout + done.stderr


def test_constrained_only_registrar_opens_joining_and_counts_move_exactly(
        lab: Lab, tmp_path: Path) -> None:
    assert COAP_CLIENT, "coap-client-openssl missing: make setup installs libcoap3-bin"
    registrar = stand_in(lab)
    daemon = ProxyDaemon(lab, tmp_path / "proxy", constrained_config(
        tmp_path / "proxy", limits={"flow_idle_timeout": 5})).start()
    wait_for(lambda: daemon.ctl()["joining"], 10, "joining open")
    status = daemon.ctl()
    assert status["ready"] is True
    assert status["registrars"][0]["healthy"] is False  # no HTTPS: the TCP probe fails
    modes = status["joining_modes"]
    assert modes["coaps"] == {"open": True, "reason": None,
                              "registrar": f"[{REGISTRAR}]:{COAPS_PORT}"}, modes
    assert modes["jpy"] == {"open": True, "reason": None,
                            "registrar": f"[{REGISTRAR}]:{JPY_PORT}"}, modes
    assert "constrained registrar" in status["joining_reason"], status["joining_reason"]
    wait_for(lambda: len(daemon.ctl()["core_join_discovery"]["links"]) == 2, 10,
             "CoRE answers on both links")
    out = libcoap(lab.pledges[0], "coap://[ff02::fd%eth0]/.well-known/core?brski-jp=*")
    assert out.strip().endswith(f"<>;brski-jp={COAPS_JOIN}"), out
    out = libcoap(lab.pledges[1], "coap://[ff02::fd%eth0]/.well-known/core?brski-jp=*")
    assert out.strip().endswith(f"<>;brski-jp={JPY_JOIN}"), out
    text = json.dumps(status)
    assert "no healthy registrar" not in status["joining_reason"], text

    # --- coaps: two flows from pledge0 (two sockets), each one datagram echoed --------------
    for payload in ("one", "two!"):
        assert pledge(lab.pledges[0], COAPS_JOIN, payload) == [f"reply {payload}"]
    t = traffic(daemon, "coaps")
    assert t["flows"] == {"active": 2, "opened": 2}, t
    assert t["datagrams"] == {"upstream": 2, "downstream": 2}, t
    assert t["bytes"] == {"upstream": 7, "downstream": 7}, t
    assert t["drops"] == {}, t
    wait_for(lambda: daemon.sample("joinproxyd_relayed_datagrams_total", mode="coaps",
                                   direction="upstream") == 2, 5, "/metrics catching up")
    assert daemon.sample("joinproxyd_relayed_bytes_total", mode="coaps",
                         direction="downstream") == 7
    assert daemon.sample("joinproxyd_circuits_active", interface="join0", mode="coaps") == 2
    # a third flow from the same address while two are open: flow-limit, exactly one
    assert pledge(lab.pledges[0], COAPS_JOIN, "three", wait=0.5) == ["none"]
    assert traffic(daemon, "coaps")["drops"] == {"flow-limit": 1}
    assert daemon.drops("coaps", "flow-limit") == 1
    # idle flows end (flow_idle_timeout 5 s): the active gauge goes down, opened stays
    wait_for(lambda: traffic(daemon, "coaps")["flows"] == {"active": 0, "opened": 2}, 15,
             "idle coaps flows to expire")
    assert daemon.sample("joinproxyd_circuits_active", interface="join0", mode="coaps") == 0

    # --- jpy: datagrams both ways, too-big, forged/stale/replayed replies -------------------
    assert pledge(lab.pledges[1], JPY_JOIN, "abc", "defg") == ["reply echo:abc",
                                                                 "reply echo:defg"]
    t = traffic(daemon, "jpy")
    assert "flows" not in t, t  # stateless: no flows to claim
    assert t["datagrams"] == {"upstream": 2, "downstream": 2}, t
    assert t["bytes"] == {"upstream": 7, "downstream": 17}, t
    assert pledge(lab.pledges[1], JPY_JOIN, "big:1200", wait=0.5) == ["none"]
    assert traffic(daemon, "jpy")["drops"] == {"too-big": 1}
    # FORGE (its own datagram relayed up) twice: each time one made-up header, one stale key
    # id, one exact replay; nothing reaches the pledge
    assert pledge(lab.pledges[1], JPY_JOIN, "FORGE", "FORGE", wait=1) == ["none", "none"]
    t = traffic(daemon, "jpy")
    assert t["drops"] == {"too-big": 1, "jpy-forged": 2, "jpy-stale": 2,
                          "jpy-replayed": 2}, t
    assert t["datagrams"] == {"upstream": 4, "downstream": 2}, t
    for reason in ("jpy-forged", "jpy-stale", "jpy-replayed"):
        assert daemon.drops("jpy", reason) == 2, reason
    log = daemon.log()
    for reason in ("jpy-forged", "jpy-stale", "jpy-replayed", "too-big"):
        lines = [line for line in log.splitlines() if f"jpy dropped ({reason})" in line]
        assert len(lines) == 1, (reason, lines)  # once, though counted twice
    [forged] = [line for line in log.splitlines() if "jpy dropped (jpy-forged)" in line]
    assert f"[{REGISTRAR}]:{JPY_PORT}" in forged, forged  # who sent it
    assert "coaps flow from fe80::" in log and "refused (flow-limit)" in log

    # --- a closed window refuses on both, counted once each --------------------------------
    daemon.host.run([PYTHON, "-m", "joinproxyd.ctl", "--socket",
                     daemon.config["daemon"]["control_socket"], "window", "close"])
    assert pledge(lab.pledges[0], COAPS_JOIN, "closed", wait=0.5) == ["none"]
    assert pledge(lab.pledges[1], JPY_JOIN, "closed", wait=0.5) == ["none"]
    assert traffic(daemon, "coaps")["drops"] == {"flow-limit": 1, "window-closed": 1}
    assert traffic(daemon, "jpy")["drops"]["window-closed"] == 1
    status = daemon.ctl()
    assert status["joining"] is False and status["joining_modes"]["coaps"]["open"] is False
    daemon.host.run([PYTHON, "-m", "joinproxyd.ctl", "--socket",
                     daemon.config["daemon"]["control_socket"], "window", "open"])
    wait_for(lambda: daemon.ctl()["joining"], 10, "joining open again")

    # the human view has a traffic table and the modes line
    human = daemon.host.run([PYTHON, "-m", "joinproxyd.ctl", "--socket",
                             daemon.config["daemon"]["control_socket"], "status"]).stdout
    assert "modes: coaps open via" in human and "jpy open via" in human, human
    assert "flow-limit=1" in human and "jpy-forged=2" in human, human
    promtool_check(daemon)

    # --- the constrained registrar goes away: answers stop, status says so ------------------
    registrar.stop()
    wait_for(lambda: not daemon.ctl()["joining"], 15, "joining to close")
    status = daemon.ctl()
    assert "no constrained registrar answers the DTLS probe" in status["joining_reason"], status
    for mode in ("coaps", "jpy"):
        assert status["joining_modes"][mode]["open"] is False
        assert status["joining_modes"][mode]["registrar"] is None
    assert status["core_join_discovery"]["serving"] is False
    assert status["core_join_discovery"]["links"] == []
    out = libcoap(lab.pledges[0], "coap://[ff02::fd%eth0]/.well-known/core?brski-jp=*")
    assert "brski-jp" not in out, out
    assert pledge(lab.pledges[0], COAPS_JOIN, "gone", wait=0.5) == ["none"]
    assert traffic(daemon, "coaps")["drops"]["no-registrar"] == 1
    promtool_check(daemon)
    daemon.stop()


def test_jpy_previous_key_opens_for_one_period_then_stale(lab: Lab, tmp_path: Path) -> None:
    registrar = stand_in(lab)
    config = constrained_config(tmp_path / "proxy", jpy={"key_rotation": 3})
    config["join"] = [config["join"][1]]
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config).start()
    wait_for(lambda: daemon.ctl()["joining"], 10, "joining open")
    assert daemon.ctl()["relays"]["jpy"]["key_rotation_seconds"] == 3
    flags = tmp_path / "flags"
    flags.mkdir()
    proc = lab.pledges[1].spawn([PYTHON, "-c", PLEDGE, str(JPY_JOIN), "1.5", "hello",
                                 f"@{flags}/one", "LATE", f"@{flags}/two", "LATE"],
                                name="jpy-pledge")
    wait_for(lambda: "reply echo:hello" in proc.log(), 10, "the first echo")
    # the key id the first header was sealed under, as the stand-in saw it
    first = next(line for line in registrar.log().splitlines() if line.startswith("header"))
    key = int(first.split()[1][:2], 16)

    def key_id() -> tuple[int, int]:
        jpy = daemon.ctl()["relays"]["jpy"]
        return jpy["key_id"], jpy["key_age_seconds"]

    # one rotation later the first header's key is the previous one: it still opens
    wait_for(lambda: key_id()[0] == (key + 1) & 0xFF, 10, "the first rotation")
    (flags / "one").touch()
    wait_for(lambda: proc.log().count("reply") + proc.log().count("none") >= 2, 10, "LATE 1")
    assert "reply late-1" in proc.log(), proc.log()
    stale = daemon.drops("jpy", "jpy-stale")
    # two rotations later it is gone: dropped as jpy-stale, counted once, nothing delivered
    wait_for(lambda: key_id()[0] == (key + 2) & 0xFF, 10, "the second rotation")
    (flags / "two").touch()
    wait_for(lambda: "done" in proc.log(), 10, "LATE 2")
    assert proc.log().splitlines()[-2] == "none", proc.log()
    assert daemon.drops("jpy", "jpy-stale") == stale + 1
    assert "older than the previous key" in daemon.log()
    # a reload takes a new period at once; a bad one is refused naming the key
    daemon.reload({**config, "jpy": {"key_rotation": 600}})
    settled = key_id()[0]
    assert daemon.ctl()["relays"]["jpy"]["key_rotation_seconds"] == 600
    time.sleep(4)  # more than the old period
    assert key_id()[0] == settled
    daemon.write_config({**config, "jpy": {"key_rotation": "1d"}})
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in daemon.log(), 10, "the reload to be refused")
    assert "jpy.key_rotation: must be a number between 1 and 2.592e+06 (got '1d')" \
        in daemon.log()
    assert daemon.ctl()["relays"]["jpy"]["key_rotation_seconds"] == 600
    daemon.stop()


@pytest.mark.parametrize("value", [0, -1, "24h", True, 31 * 86400])
def test_bad_key_rotation_names_the_key_and_the_reason(value: object) -> None:
    data = {"backbone": {"interface": "bb0"}, "registrars": {"discovery": ["grasp"]},
            "jpy": {"key_rotation": value}}
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.parse(data)
    assert str(caught.value).startswith("jpy.key_rotation: must be a number between 1 and "
                                        "2.592e+06"), caught.value


def test_key_rotation_default_is_a_day_and_unknown_jpy_keys_are_refused() -> None:
    base = {"backbone": {"interface": "bb0"}, "registrars": {"discovery": ["grasp"]}}
    assert config_mod.parse(dict(base)).jpy.key_rotation == 86400
    assert config_mod.parse({**base, "jpy": {"key_rotation": 3600}}).jpy.key_rotation == 3600
    with pytest.raises(config_mod.ConfigError, match=r"^jpy\.rotation: unknown key"):
        config_mod.parse({**base, "jpy": {"rotation": 3600}})


GUARD_FLOOD = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    d = ("fe80::1", int(sys.argv[1]), 0, socket.if_nametoindex("eth0"))
    for _ in range(300):
        s.sendto(b"x", d)
""")


@pytest.fixture
def bpffs(as_root: None, tmp_path: Path) -> Iterator[Path]:
    """A bpf filesystem of the test's own; the daemon pins its maps in <it>/joinproxyd."""
    mnt = tmp_path / "bpffs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_the_guard_covers_both_udp_join_ports(lab: Lab, bpffs: Path, tmp_path: Path) -> None:
    """A source flooding the coaps or the jpy join port, or CoRE discovery on 5683, is cut off
    in XDP while another pledge on the same link is relayed."""
    stand_in(lab)
    config = constrained_config(tmp_path / "proxy", guard={"enabled": True, "rate": 5,
                                                           "burst": 10})
    config["daemon"]["bpf_pin_dir"] = str(bpffs / "joinproxyd")
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config).start()
    wait_for(lambda: daemon.ctl()["joining"], 10, "joining open")
    guard = daemon.ctl()["guard"]
    # and CoAP's 5683, where the links answer CoRE discovery
    assert sorted(guard["ports"]) == sorted([5683, COAPS_JOIN, JPY_JOIN]), guard
    assert set(guard["interfaces"]) == {"join0", "join1"}, guard
    for flooder, quiet, port, mode in ((2, 0, COAPS_JOIN, "coaps"), (3, 1, JPY_JOIN, "jpy")):
        before = daemon.drops("guard", "rate-limit")
        lab.pledges[flooder].run([PYTHON, "-c", GUARD_FLOOD, str(port)])
        wait_for(lambda b=before: daemon.drops("guard", "rate-limit") - b >= 250, 10,
                 f"the guard dropping the flood on the {mode} port")
        up = daemon.ctl()["traffic"][mode]["datagrams"]["upstream"]
        assert up <= 20, up  # what got through: at most burst + rate x the flood's time
        # another pledge on the same link is not touched
        reply = pledge(lab.pledges[quiet], port, "still-here")
        assert reply == [f"reply {'echo:' if mode == 'jpy' else ''}still-here"], reply
    # a CoRE discovery flood is cut off too (the responder answers each GET it gets)
    before = daemon.drops("guard", "rate-limit")
    lab.pledges[2].run([PYTHON, "-c", GUARD_FLOOD, "5683"])
    wait_for(lambda: daemon.drops("guard", "rate-limit") - before >= 250, 10,
             "the guard dropping the flood on the CoRE discovery port")
    # the two flooders are named (the guard looks at its buckets every few seconds)
    wait_for(lambda: len({e["source"] for e in daemon.ctl()["guard"]["dropped_most"]}) == 2,
             15, "the guard naming both flooders")
    daemon.stop()


# --- pure parts --------------------------------------------------------------------------------


def test_each_constrained_kind_gets_a_healthy_endpoint_of_its_own_and_health_changes_tell():
    """Registrar A offers only JPY, B only CoAPS: "auto" chooses A, yet a coaps link is given
    B; when B stops answering the control plane is told (the choice itself is unchanged)."""
    import asyncio
    import logging

    from joinproxyd.discovery.constrained import ConstrainedRegistrars, UdpKind, UdpRegistrar

    jpy_a = UdpRegistrar(UdpKind.JPY, "fd00::a", 7634)
    coaps_b = UdpRegistrar(UdpKind.COAPS, "fd00::b", 5684)
    health: dict = {jpy_a: None, coaps_b: None}
    changes: list[int] = []

    async def probe(registrar, timeout):  # type: ignore[no-untyped-def]
        return health[registrar]

    async def main() -> None:
        table = ConstrainedRegistrars(log=logging.getLogger("t"), health_interval=1,
                                      health_timeout=1, on_change=lambda: changes.append(1),
                                      probe=probe)
        table.offer(jpy_a, "grasp", 90)
        table.offer(coaps_b, "grasp", 90)
        assert table.endpoint_for(UdpKind.COAPS) is None  # nothing probed yet
        await table._pass()
        assert table.chosen is not None and table.chosen.address == "fd00::a"
        jpy, coaps = table.endpoint_for(UdpKind.JPY), table.endpoint_for(UdpKind.COAPS)
        assert jpy is not None and (jpy.address, jpy.jpy_port) == ("fd00::a", 7634)
        assert coaps is not None and (coaps.address, coaps.coaps_port) == ("fd00::b", 5684)
        told = len(changes)
        health[coaps_b] = "no DTLS answer"
        await table._pass()
        assert table.endpoint_for(UdpKind.COAPS) is None
        assert table.chosen is not None and table.chosen.address == "fd00::a"
        assert len(changes) == told + 1  # told, though the chosen registrar is the same
        await table._pass()
        assert len(changes) == told + 1  # nothing changed: not told again
        health[coaps_b] = None
        await table._pass()
        table.withdraw(coaps_b, "grasp")  # a healthy endpoint forgotten: told too
        assert len(changes) == told + 3
    asyncio.run(main())


def test_status_renders_modes_and_traffic() -> None:
    from joinproxyd.ctl import render_joining_modes, render_traffic

    lines = render_joining_modes({
        "coaps": {"open": True, "reason": None, "registrar": "[fd00::1]:5684"},
        "circuit": {"open": False, "reason": "no healthy registrar", "registrar": None}})
    assert lines == ["modes: circuit CLOSED (no healthy registrar); coaps open via "
                     "[fd00::1]:5684"]
    text = "\n".join(render_traffic({
        "coaps": {"flows": {"active": 1, "opened": 3}, "datagrams": {"upstream": 5,
                                                                     "downstream": 4},
                  "bytes": {"upstream": 50, "downstream": 40}, "drops": {"flow-limit": 2}},
        "nat66": {"flows": {"active": None, "opened": 7}, "drops": {}},
        "jpy": {"datagrams": {"upstream": 1, "downstream": 0}, "drops": {"jpy-stale": 1}}}))
    assert "coaps  1/3" in text and "5/4" in text and "50/40" in text, text
    assert "flow-limit=2" in text and "jpy-stale=1" in text, text
    assert "nat66  -/7" in text, text
    assert render_traffic(None) == []


def test_circuit_traffic_in_status_matches_metrics(lab: Lab, tmp_path: Path) -> None:
    """The traffic table is generic: the circuit mode's flows and bytes are there too."""
    from lab.proxyd import echo_registrar, talk

    echo_registrar(lab.registrars[0], "r0")
    daemon = ProxyDaemon(lab, tmp_path / "proxy", base_config(tmp_path / "proxy")).start()
    wait_for(lambda: daemon.ctl()["joining"], 10, "joining open")
    assert daemon.ctl()["joining_modes"]["circuit"]["open"] is True
    assert talk(lab.pledges[0], "hello") == "r0\nhello\n"
    wait_for(lambda: traffic(daemon, "circuit")["flows"] == {"active": 0, "opened": 1}, 10,
             "the circuit to close")
    t = traffic(daemon, "circuit")
    assert t["bytes"] == {"upstream": 6, "downstream": 9}, t
    assert daemon.sample("joinproxyd_relayed_bytes_total", mode="circuit",
                         direction="downstream") == 9
    assert "datagrams" not in t, t
    daemon.stop()


def test_a_coaps_datagram_that_cannot_be_sent_is_counted_and_logged(lab: Lab,
                                                                     tmp_path: Path) -> None:
    """The route to the registrar goes away under an open flow: the pledge's next datagram
    is not sent, counted as send-error once and logged with the pledge and why."""
    stand_in(lab)
    config = constrained_config(tmp_path / "proxy")
    config["registrars"]["health_interval"] = 30
    config["join"] = [config["join"][0]]
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config).start()
    wait_for(lambda: daemon.ctl()["joining"], 10, "joining open")
    flag = tmp_path / "route-gone"
    proc = lab.pledges[0].spawn([PYTHON, "-c", PLEDGE, str(COAPS_JOIN), "1", "first",
                                 f"@{flag}", "second"], name="coaps-pledge")
    wait_for(lambda: "reply first" in proc.log(), 10, "the first echo")
    routes = json.loads(lab.proxy.run(["ip", "-j", "-6", "route", "show", "match",
                                       REGISTRAR]).stdout)
    for route in routes:  # every route that reaches the registrar (probes are 30 s apart)
        lab.proxy.run(["ip", "-6", "route", "del", route["dst"], "dev", route["dev"]])
    flag.touch()
    wait_for(lambda: "done" in proc.log(), 10, "the second datagram")
    assert proc.log().splitlines()[-2] == "none", proc.log()
    t = traffic(daemon, "coaps")
    assert t["drops"] == {"send-error": 1}, t
    assert t["datagrams"]["upstream"] == 1, t
    lines = [line for line in daemon.log().splitlines() if "to the registrar not sent" in line]
    assert len(lines) == 1 and "unreachable" in lines[0].lower(), lines
    daemon.stop()
