"""CoRE join-port discovery on join links (discovery/coap_join.py): what pledges hear when they
ask ``/.well-known/core?brski-jp=*`` or the legacy ``?rt=brski.jp``, only while the control
plane says a constrained mode serves the link and joining is open."""

import asyncio
import logging
import socket
import sys
import textwrap
import time

import aiocoap

from brski import linkformat
from joinproxyd.discovery.coap_join import (
    JoinPortAnnouncer,
    JoinPortTarget,
    constrained_targets,
)
from joinproxyd.model import JoinInterface
from joinproxyd.relays import mode_class, mode_names
from joinproxyd.relays.base import RelayMode
from lab import Lab, Topology

PY = sys.executable
JOIN_PORT = 8485


def _iface(name: str, index: int, modes: tuple[str, ...], port: int = JOIN_PORT):
    return JoinInterface(name, index, "fe80::1", (), modes, port)


# --- pure parts --------------------------------------------------------------------------------


def test_targets_are_the_constrained_links_while_joining():
    served = [_iface("join0", 3, ("circuit",)), _iface("join1", 4, ("circuit", "coaps")),
              _iface("join2", 5, ("jpy",), 9000)]
    picked = constrained_targets(served, True, lambda mode: mode in ("coaps", "jpy"))
    assert picked == [JoinPortTarget("join1", 4, "fe80::1", JOIN_PORT),
                      JoinPortTarget("join2", 5, "fe80::1", 9000)]
    assert constrained_targets(served, False, lambda mode: True) == []


def test_modes_say_whether_they_are_constrained():
    # The daemon asks the mode class; a mode turns discovery on by setting the attribute.
    assert RelayMode.constrained is False
    for name in mode_names():
        assert mode_class(name).constrained is (name in ("coaps", "jpy")), name


def test_answer_links_current_and_legacy_form():
    target = JoinPortTarget("join0", 3, "fe80::1", JOIN_PORT)
    got = {q: linkformat.format_links(linkformat.filter_links(target.links(), [q]))
           for q in ("brski-jp=*", "rt=brski.jp", "rt=brski", "rt=brski.rjp")}
    assert got == {"brski-jp=*": f"<>;brski-jp={JOIN_PORT}",
                   "rt=brski.jp": f"<coaps://[fe80::1]:{JOIN_PORT}>;rt=brski.jp",
                   "rt=brski": "", "rt=brski.rjp": ""}


# --- the announcer on loopback (unicast) -------------------------------------------------------


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


async def _ask(port: int, query: str | None) -> aiocoap.Message | None:
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        uri = f"coap://[::1]:{port}/.well-known/core" + (f"?{query}" if query else "")
        request = aiocoap.Message(code=aiocoap.GET, uri=uri)
        try:
            return await asyncio.wait_for(ctx.request(request).response, 3)
        except (TimeoutError, aiocoap.error.Error):
            return None
    finally:
        await ctx.shutdown()


def test_announcer_answers_per_interface_and_closes_when_told(caplog):
    async def main():
        port = _free_udp_port()
        log = logging.getLogger("test.corejoin")
        ann = JoinPortAnnouncer(log, port=port, leisure=0)
        lo = socket.if_nametoindex("lo")
        try:
            await ann.set_targets([JoinPortTarget("lo", lo, "fe80::1", JOIN_PORT)])
            assert ann.serving
            current = await _ask(port, "brski-jp=*")
            legacy = await _ask(port, "rt=brski.jp")
            unmatched = await _ask(port, "rt=brski")
            everything = await _ask(port, None)
            # Another link's target only: a request arriving on lo gets an empty document.
            await ann.set_targets([JoinPortTarget("lo", lo + 1000, "fe80::1", JOIN_PORT)])
            other = await _ask(port, "brski-jp=*")
            await ann.set_targets([])  # joining closed
            closed_serving = ann.serving
            closed = await _ask(port, "brski-jp=*")
            status = ann.status()
        finally:
            await ann.stop()
        return current, legacy, unmatched, everything, other, closed_serving, closed, status

    with caplog.at_level(logging.INFO, logger="test.corejoin"):
        current, legacy, unmatched, everything, other, closed_serving, closed, status = \
            asyncio.run(main())
    assert current.code == aiocoap.CONTENT and current.opt.content_format == 40
    assert current.payload == f"<>;brski-jp={JOIN_PORT}".encode()
    assert legacy.payload == f"<coaps://[fe80::1]:{JOIN_PORT}>;rt=brski.jp".encode()
    assert unmatched.code == aiocoap.CONTENT and unmatched.payload == b""  # unicast: empty
    assert everything.payload == (f"<>;brski-jp={JOIN_PORT},"
                                  f"<coaps://[fe80::1]:{JOIN_PORT}>;rt=brski.jp").encode()
    assert other.payload == b""
    assert closed_serving is False and closed is None  # the socket is gone: no answer at all
    assert status["serving"] is False and status["links"] == []
    assert "answering on lo (port 8485)" in caplog.text
    assert "no longer answering" in caplog.text


def test_port_taken_is_reported_once_and_retried():
    async def main():
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as holder:
            holder.bind(("::", 0))
            port = holder.getsockname()[1]
            records: list[str] = []

            class Keep(logging.Handler):
                def emit(self, record):
                    records.append(record.getMessage())

            log = logging.getLogger("test.corejoin.taken")
            log.addHandler(handler := Keep())
            ann = JoinPortAnnouncer(log, port=port, leisure=0)
            target = [JoinPortTarget("lo", socket.if_nametoindex("lo"), "fe80::1", JOIN_PORT)]
            await ann.set_targets(target)
            await ann.set_targets(target)
            taken = (ann.serving, ann.status()["error"], list(records))
        await ann.set_targets(target)  # the port is free now: the retry binds
        freed = ann.serving
        await ann.stop()
        log.removeHandler(handler)
        return taken, freed

    (serving, error, records), freed = asyncio.run(main())
    assert serving is False and "cannot bind UDP" in error
    assert len([r for r in records if "cannot bind" in r]) == 1
    assert freed is True


# --- in namespaces: libcoap on a pledge's link, multicast ff02::fd ---------------------------

ANNOUNCER = """
    import asyncio, logging, os, socket, sys
    from joinproxyd.discovery.coap_join import JoinPortAnnouncer, JoinPortTarget
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    flag = sys.argv[1]
    async def main():
        ann = JoinPortAnnouncer(logging.getLogger("proxy"), leisure=0.1)
        target = JoinPortTarget("join0", socket.if_nametoindex("join0"), sys.argv[2], 8485)
        await ann.set_targets([target])
        print("SERVING", flush=True)
        while not os.path.exists(flag + ".close"):
            await asyncio.sleep(0.05)
        await ann.set_targets([])
        print("CLOSED", flush=True)
        while not os.path.exists(flag + ".stop"):
            await asyncio.sleep(0.05)
        await ann.stop()
    asyncio.run(main())
"""


def _wait_for(proc, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.log():
        assert proc.alive() and time.monotonic() < deadline, proc.log()
        time.sleep(0.05)


def _libcoap(host, uri: str, verbosity: int = 3) -> str:
    done = host.run(["coap-client-openssl", "-N", "-v", str(verbosity), "-m", "get",
                     "-B", "2", uri], timeout=30, check=False)
    return done.stdout + done.stderr


def test_pledge_finds_the_join_port_with_libcoap_only_while_open(as_root, tmp_path):
    with Lab(Topology(pledges=1), log_dir=tmp_path / "logs") as lab:
        ll = lab.proxy.address("join0", link_local=True).split("/")[0]
        flag = str(tmp_path / "flag")
        proc = lab.proxy.spawn([PY, "-c", textwrap.dedent(ANNOUNCER), flag, ll],
                               name="corejoin")
        _wait_for(proc, "SERVING")
        pledge = lab.pledges[0]
        out = _libcoap(pledge, "coap://[ff02::fd%eth0]/.well-known/core?brski-jp=*")
        assert out.strip() == f"<>;brski-jp={JOIN_PORT}", out
        [link] = linkformat.parse_join_ports(out.strip())
        assert link.port == JOIN_PORT and not link.legacy
        out = _libcoap(pledge, "coap://[ff02::fd%eth0]/.well-known/core?rt=brski.jp")
        assert out.strip() == f"<coaps://[{ll}]:{JOIN_PORT}>;rt=brski.jp", out
        out = _libcoap(pledge, f"coap://[{ll}%eth0]/.well-known/core?brski-jp=*")  # unicast
        assert out.strip() == f"<>;brski-jp={JOIN_PORT}", out
        # A multicast query nothing matches gets no answer at all (RFC 7252 §8.2).
        out = _libcoap(pledge, "coap://[ff02::fd%eth0]/.well-known/core?rt=brski.rjp", 7)
        assert "c:GET" in out and "c:2." not in out, out
        (tmp_path / "flag.close").touch()
        _wait_for(proc, "CLOSED")
        out = _libcoap(pledge, "coap://[ff02::fd%eth0]/.well-known/core?brski-jp=*", 7)
        assert "c:GET" in out and "c:2." not in out, out
        (tmp_path / "flag.stop").touch()
        proc.popen.wait(10)
        assert proc.popen.returncode == 0, proc.log()
        assert "Traceback" not in proc.log()


def test_garbage_on_the_join_port_discovery_socket_is_counted_and_logged_once(caplog):
    async def main():
        port = _free_udp_port()
        counted: list[int] = []
        ann = JoinPortAnnouncer(logging.getLogger("test.corejoin.garbage"), port=port,
                                leisure=0, refused=lambda: counted.append(1))
        lo = socket.if_nametoindex("lo")
        await ann.set_targets([JoinPortTarget("lo", lo, "fe80::1", JOIN_PORT)])
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            for _ in range(5):
                for garbage in (b"\xff" * 9, b"\x40", bytes(range(256))):
                    s.sendto(garbage, ("::1", port))
        await asyncio.sleep(0.3)
        still = await _ask(port, "brski-jp=*")  # it keeps answering
        await ann.stop()
        return len(counted), ann.status()["unparsable"], still

    with caplog.at_level(logging.DEBUG, logger="test.corejoin.garbage"):
        counted, unparsable, still = asyncio.run(main())
    assert counted == unparsable == 15
    assert caplog.text.count("unparsable") == 1
    assert still.payload == f"<>;brski-jp={JOIN_PORT}".encode()
