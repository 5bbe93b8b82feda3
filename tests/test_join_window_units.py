"""The join window and the refusal ring, the control socket's arguments and peer, the
joinproxyctl renderings, and what a closed window means for each relay's kernel plan:
pure code, no namespaces."""

import asyncio
import ipaddress
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from joinproxyd import ctl
from joinproxyd.config import ConfigError, IpipSettings, parse
from joinproxyd.control import ControlError, ControlServer, Request
from joinproxyd.metrics import Metrics
from joinproxyd.model import (
    IpipTarget,
    JoinInterface,
    LinkState,
    PolicyDropReason,
    RegistrarEndpoint,
)
from joinproxyd.relays.ipip import make_plan
from joinproxyd.relays.nat66 import WINDOW_COUNTER, build_ruleset
from joinproxyd.window import RING_SIZE, JoinWindow, RefusalLog, pledge_key

MINIMAL = {"backbone": {"interface": "bb0"}, "join": [{"interfaces": ["join0"]}]}


# -- the window and the ring ------------------------------------------------------------------

def test_the_window_says_who_changed_it_and_when_and_ignores_no_change() -> None:
    window = JoinWindow(True, "configuration", 1.0)
    assert window.set(True, "uid 0", 2.0) is False and window.by == "configuration"
    assert window.set(False, "uid 0 (root), pid 7", 3.0) is True
    assert window.status() == {"state": "closed", "by": "uid 0 (root), pid 7", "since": 3.0}
    assert window.set(True, "configuration reload", 4.0) and window.state == "open"


@pytest.mark.parametrize(("spelling", "key"), [
    ("fe80::1:2%join0", "fe80::1:2"), ("[FD00::1]:8443", "fd00::1"), ("[fe80::1%eth0]",
                                                                       "fe80::1"),
    (" fd00::7 ", "fd00::7")])
def test_pledge_addresses_compare_without_brackets_port_or_scope(spelling: str,
                                                                 key: str) -> None:
    assert pledge_key(spelling) == key


def test_refusals_are_grouped_per_pledge_and_interface_most_recent_first() -> None:
    ring = RefusalLog()
    ring.add("fe80::1:1%join0", "rate-limit", "join0", "circuit", now=10)
    ring.add("fe80::1:2%join0", "window-closed", "join0", "circuit", now=11)
    ring.add("fe80::1:1%join0", "window-closed", "join0", "circuit", now=12)
    ring.add("fe80::1:1%join1", "limit-pledge", "join1", "circuit", now=13)
    groups = ring.by_pledge()
    assert [(g["pledge"], g["interface"], g["count"], g["last_reason"], g["last_time"])
            for g in groups] == [
        ("fe80::1:1%join1", "join1", 1, "limit-pledge", 13),
        ("fe80::1:1%join0", "join0", 2, "window-closed", 12),
        ("fe80::1:2%join0", "join0", 1, "window-closed", 11)]
    assert groups[1]["reasons"] == {"rate-limit": 1, "window-closed": 1}
    assert [g["interface"] for g in ring.by_pledge("[FE80::1:1]")] == ["join1", "join0"]
    assert ring.by_pledge("fe80::99") == []


def test_the_ring_is_bounded_and_forgets_the_oldest() -> None:
    ring = RefusalLog()
    for i in range(RING_SIZE + 44):  # a flood of distinct sources cannot grow it
        ring.add(f"fd00::{i:x}", "rate-limit", "join0", "circuit", now=i)
    assert len(ring.entries) == RING_SIZE
    assert ring.by_pledge("fd00::0") == []  # the oldest went first
    assert ring.by_pledge(f"fd00::{RING_SIZE + 43:x}")[0]["count"] == 1


# -- configuration --------------------------------------------------------------------------

def test_join_window_is_open_unless_configured_closed() -> None:
    assert parse(MINIMAL).join_window == "open"
    closed = parse({**MINIMAL, "daemon": {"join_window": "closed"}})
    assert closed.join_window == "closed"
    with pytest.raises(ConfigError, match=r"daemon.join_window: must be one of open, closed "
                                          r"\(got 'ajar'\)"):
        parse({**MINIMAL, "daemon": {"join_window": "ajar"}})
    with pytest.raises(ConfigError, match=r"daemon\.join_window: must be a string"):
        parse({**MINIMAL, "daemon": {"join_window": False}})


def test_the_new_drop_reasons_are_exported_at_zero_for_every_mode() -> None:
    metrics = Metrics()
    metrics.add_mode("circuit")
    values = metrics.drops.values()
    for reason in PolicyDropReason:
        assert values[("circuit", reason.value)] == 0
    metrics.drop("circuit", PolicyDropReason.WINDOW_CLOSED)
    assert metrics.drops.values()[("circuit", "window-closed")] == 1
    assert metrics.registry.get_sample_value("joinproxyd_join_window_open") == 1


# -- the control socket -----------------------------------------------------------------------

def raw(path: Path, message: Any) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(json.dumps(message).encode() + b"\n")
        return json.loads(sock.makefile().readline())


def test_handlers_get_their_arguments_and_the_peer_and_may_refuse(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    seen: list[Request] = []

    async def window(request: Request) -> dict[str, Any]:
        seen.append(request)
        if request.args.get("state") not in (None, "open", "close"):
            raise ControlError("window: state must be open or close")
        await asyncio.sleep(0)  # a coroutine: awaited before the reply
        return {"state": request.args.get("state", "open")}

    async def scenario() -> None:
        server = ControlServer(path, {"window": window, "status": lambda: {"up": True}})
        await server.start()
        loop = asyncio.get_running_loop()

        def call(message: Any) -> dict[str, Any]:
            return raw(path, message)

        assert await loop.run_in_executor(None, call, {"command": "window",
                                                       "args": {"state": "close"}}) == {
            "ok": True, "window": {"state": "close"}}
        assert seen[-1].uid == os.getuid() and seen[-1].pid == os.getpid()
        assert seen[-1].who.startswith(f"uid {os.getuid()}") and f"pid {os.getpid()}" \
            in seen[-1].who
        assert await loop.run_in_executor(None, call, {"command": "window",
                                                       "args": {"state": "ajar"}}) == {
            "ok": False, "error": "window: state must be open or close"}
        refused = await loop.run_in_executor(None, call, {"command": "window", "args": [1]})
        assert refused == {"ok": False, "error": '"args" must be an object'}
        assert (await loop.run_in_executor(None, call, {"command": "status"}))["status"] == {
            "up": True}
        result = await loop.run_in_executor(
            None, lambda: ctl.request(path, "window", args={"state": "open"}))
        assert result == {"state": "open"}
        await server.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_an_unknown_uid_is_still_named() -> None:
    assert Request({}, 4_000_000_000 % 2**31, 9).who == f"uid {4_000_000_000 % 2**31}, pid 9"
    assert Request({}).who == "an unknown peer"


# -- joinproxyctl ------------------------------------------------------------------------------

def test_renderings_of_the_window_refusals_and_drops() -> None:
    status = {"version": "0.1.0", "pid": 1, "uptime": 3.0, "joining": False,
              "joining_reason": "join window closed by uid 0 (root), pid 9",
              "join_window": {"state": "closed", "by": "uid 0 (root), pid 9", "since": 0.0},
              "backbone": {"name": "bb0", "ready": True}, "interfaces": [],
              "registrars": [], "relays": {}, "counters": {}}
    text = ctl.render_status(status)
    assert "joining CLOSED (join window closed by uid 0 (root), pid 9)" in text
    assert "join window: closed (since " in text and "by uid 0 (root), pid 9)" in text
    refusals = [{"pledge": "fe80::1:2%join0", "interface": "join0", "mode": "circuit",
                 "count": 3, "last_reason": "window-closed", "last_time": 0.0,
                 "reasons": {"rate-limit": 1, "window-closed": 2}}]
    table = ctl.render_refusals(refusals).splitlines()
    assert table[0].split()[:4] == ["pledge", "interface", "mode", "count"]
    assert table[1].split()[:5] == ["fe80::1:2%join0", "join0", "circuit", "3",
                                    "window-closed"]
    assert table[1].endswith("rate-limit=1,window-closed=2")
    assert ctl.render_refusals([]) == "no refusals recorded"
    nat66 = {"mode": "nat66", "interface": "join0", "pledge": "[fd00::5]:4000",
             "proxy": "[fd00::1]:8443", "registrar": "[fd4a::1]:443"}
    line = ctl.render_circuits([nat66]).splitlines()[1].split()
    assert line[0] == "-" and line[1] == "nat66" and line[-1] == "-"
    assert ctl.render_dropped([{"id": 4, "pledge": "fe80::1:1%join0", "registrar": "[r]:1",
                                "interface": "join0"}]) == \
        "dropped circuit 4 fe80::1:1%join0 -> [r]:1 on join0"


# -- what the relays' kernel plans hold while closed ----------------------------------------------

JOIN0 = JoinInterface("join0", 5, "fe80::1", ("fd4a:5044:0:100::1",), ("nat66",), 8443)
REGISTRAR = RegistrarEndpoint(100, "fd4a:5044::100", 443)


def test_nat66_with_the_window_closed_translates_nothing_new_and_counts_it() -> None:
    spec = build_ruleset([JOIN0], REGISTRAR, "bb0", window_closed=True)
    text = json.dumps(spec)
    assert '{"dnat":' not in text and "masquerade" not in text
    assert {"counter": {"name": WINDOW_COUNTER}} in spec
    prerouting = [obj["rule"]["expr"] for obj in spec
                  if obj.get("rule", {}).get("chain") == "prerouting"]
    assert prerouting[0][-1] == {"counter": WINDOW_COUNTER}
    # what is established goes on: NATed flows, and flows to the registrar itself
    forward = [obj["rule"]["expr"] for obj in spec
               if obj.get("rule", {}).get("chain") == "forward"]
    assert any({"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}
               in rule for rule in forward)
    assert any({"match": {"op": "in", "left": {"ct": {"key": "state"}},
                          "right": ["established", "related"]}} in rule
               and {"accept": None} in rule for rule in forward)
    # an open window's table is what it always was (no window counter in it)
    assert WINDOW_COUNTER not in json.dumps(build_ruleset([JOIN0], REGISTRAR, "bb0"))


def test_ipip_with_the_window_closed_keeps_relaying_but_answers_no_neighbour() -> None:
    settings = IpipSettings(41, ipaddress.IPv6Network("fd4a:5044::1:0/112"))
    registrar = RegistrarEndpoint(10, "fd4a:5044::100", 8443, ipip=IpipTarget(
        "fe80::1234", "fd4a:5044::100", (41,), (8443,)))
    join = JoinInterface("join0", 3, "fe80::1", (), ("ipip",), 8443)
    backbone = LinkState("bb0", 2, True, ("fe80::b:1",))
    plan = make_plan([join], registrar, settings, backbone)
    plan.window_open = False
    assert plan.relaying and plan.joins(41) and plan.addresses()
    assert plan.proxies() == set()
    plan.window_open = True
    assert plan.proxies() == {(3, "fe80::1234")}
