"""The control socket and joinproxyctl against it: replies, errors, permissions."""

import asyncio
import json
import socket
import stat
import subprocess
import sys

import pytest

from joinproxyd import ctl
from joinproxyd.control import ControlServer

STATUS = {
    "version": "0.1.0", "pid": 1, "uptime": 12.0, "joining": True,
    "backbone": {"name": "bb0", "ready": True},
    "interfaces": [{"name": "join0", "index": 2, "link_local": "fe80::1", "routable": [],
                    "modes": ["circuit"], "port": 8443}],
    "registrars": [{"address": "fd4a:5044::100", "port": 8443, "source": "static",
                    "preference": 10, "healthy": True, "active": True}],
    "relays": {"circuit": {"active": 1}},
    "counters": {'joinproxyd_drops_total{mode="circuit",reason="rate-limit"}': 3.0},
}
CIRCUITS = [{"mode": "circuit", "interface": "join0", "pledge": "fe80::1:1%join0",
             "registrar": "[fd4a:5044::100]:8443", "seconds": 1.5, "bytes_up": 10,
             "bytes_down": 20}]


def raw(path, data: bytes) -> dict:  # type: ignore[no-untyped-def]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(data)
        return json.loads(sock.makefile().readline())


def test_control_socket_answers_and_refuses(tmp_path):
    path = tmp_path / "run" / "control.sock"

    async def scenario() -> None:
        server = ControlServer(path, {"status": lambda: STATUS, "circuits": lambda: CIRCUITS})
        await server.start()
        loop = asyncio.get_running_loop()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert await loop.run_in_executor(None, ctl.request, path, "status") == STATUS
        assert await loop.run_in_executor(None, ctl.request, path, "circuits") == CIRCUITS
        unknown = await loop.run_in_executor(None, raw, path, b'{"command": "reboot"}\n')
        assert unknown == {"ok": False,
                           "error": "unknown command 'reboot'; known: circuits, status"}
        garbage = await loop.run_in_executor(None, raw, path, b"\xff\xfe junk\n")
        assert garbage["ok"] is False
        huge = await loop.run_in_executor(None, raw, path, b"x" * 10000 + b"\n")
        assert huge["ok"] is False
        with pytest.raises(ctl.CtlError, match="unknown command"):
            await loop.run_in_executor(None, ctl.request, path, "nope")
        await server.close()
        assert not path.exists()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_stale_socket_file_is_replaced(tmp_path):
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a file left by a killed daemon

    async def scenario() -> None:
        server = ControlServer(path, {"status": lambda: STATUS})
        await server.start()
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, ctl.request, path, "status") == STATUS
        await server.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_renderings_show_what_an_operator_needs():
    text = ctl.render_status(STATUS)
    assert "joining open" in text
    assert "join0" in text and "fe80::1" in text and "8443" in text
    assert "[fd4a:5044::100]:8443" in text
    assert 'reason="rate-limit"' in text
    assert "fe80::1:1%join0" in ctl.render_circuits(CIRCUITS)
    assert ctl.render_circuits([]) == "no open circuits"


def test_ctl_without_a_daemon_fails_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "joinproxyd.ctl", "--socket",
                           str(tmp_path / "none.sock"), "status"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr == (f"joinproxyctl: {tmp_path / 'none.sock'}: no such socket; "
                           "is joinproxyd running?\n")
