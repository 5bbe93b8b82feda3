"""sd_notify: messages, a fake NOTIFY_SOCKET, the watchdog only while alive, no-op without."""

import asyncio
import socket

from joinproxyd import sdnotify


def listener(tmp_path):  # type: ignore[no-untyped-def]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(2)
    return sock, str(path)


def test_messages():
    assert sdnotify.ready("serving join0") == b"READY=1\nSTATUS=serving join0"
    assert sdnotify.stopping() == b"STOPPING=1"
    assert sdnotify.watchdog() == b"WATCHDOG=1"


def test_watchdog_interval_is_half_of_watchdog_usec():
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "4000000"}, 1) == 2.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "2"}, 1) \
        is None
    assert sdnotify.watchdog_interval({}, 1) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "junk"}, 1) is None


def test_without_notify_socket_nothing_is_sent_and_nothing_raises():
    notifier = sdnotify.Notifier(env={})
    assert notifier.send(sdnotify.ready("x")) is False


def test_send_to_a_missing_socket_does_not_raise(tmp_path):
    notifier = sdnotify.Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.send(b"READY=1") is False


def test_ready_reaches_the_socket(tmp_path):
    sock, path = listener(tmp_path)
    notifier = sdnotify.Notifier(env={"NOTIFY_SOCKET": path})
    assert notifier.send(sdnotify.ready("ok"))
    assert sock.recv(4096) == b"READY=1\nSTATUS=ok"


def test_abstract_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"joinproxyd-test-{id(sock)}"
    sock.bind("\0" + name)
    sock.settimeout(2)
    assert sdnotify.Notifier(env={"NOTIFY_SOCKET": "@" + name}).send(b"STOPPING=1")
    assert sock.recv(100) == b"STOPPING=1"


def test_watchdog_pings_only_while_alive(tmp_path):
    sock, path = listener(tmp_path)
    sock.setblocking(False)
    state = {"alive": True}

    async def scenario() -> tuple[int, int]:
        notifier = sdnotify.Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
        notifier.start_watchdog(lambda: state["alive"])
        await asyncio.sleep(0.3)
        alive_pings = drain(sock)
        state["alive"] = False
        await asyncio.sleep(0.3)
        dead_pings = drain(sock)
        await notifier.close()
        return alive_pings, dead_pings

    alive_pings, dead_pings = asyncio.run(scenario())
    assert alive_pings >= 4  # every 50 ms
    assert dead_pings == 0


def drain(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            assert sock.recv(100) == b"WATCHDOG=1"
        except BlockingIOError:
            return count
        count += 1
