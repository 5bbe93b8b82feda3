"""Lab helpers run inside namespaces for the coaps relay tests (python tests/coaps_probe.py ...).

``echo NAME PORT``: a UDP registrar stand-in that answers each datagram with
``NAME <source port it saw> <datagram>``, so a test sees which source port each flow has; a
DTLS ClientHello (the proxy's health probe) gets a HelloVerifyRequest, as a registrar's would.

``pledge TARGET PORT WAIT PAYLOAD...``: one UDP socket (own source port) per payload, each
sends its payload to [TARGET]:PORT; meanwhile a raw ICMPv6 socket records every error that
arrives. Prints JSON: per payload the reply (or null), and each ICMPv6 error's type, code and
the UDP payload and ports of the invoking packet it quotes.
"""

import json
import select
import socket
import struct
import sys
import time


def hello_verify_request() -> bytes:
    """A DTLS 1.2 record holding a HelloVerifyRequest with a one-byte cookie: what the
    proxy's DTLS probe (discovery/constrained.py) takes as a live registrar."""
    body = b"\xfe\xff\x01X"  # server_version, cookie length, cookie
    handshake = (bytes([3]) + len(body).to_bytes(3, "big") + b"\0\0" + b"\0\0\0"
                 + len(body).to_bytes(3, "big") + body)
    return b"\x16\xfe\xfd" + b"\0" * 8 + struct.pack("!H", len(handshake)) + handshake


def is_client_hello(data: bytes) -> bool:
    return len(data) > 13 and data[0] == 22 and data[13] == 1


def echo(name: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.bind(("::", port))
    while True:
        data, addr = sock.recvfrom(65535)
        if is_client_hello(data):
            sock.sendto(hello_verify_request(), addr)
            continue
        sock.sendto(f"{name} {addr[1]} ".encode() + data, addr)


def pledge(target: str, port: int, wait: float, payloads: list[str]) -> None:
    icmp = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    socks = []
    for text in payloads:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.bind(("::", 0))
        sock.sendto(text.encode(), (target, port, 0, socket.if_nametoindex("eth0")))
        socks.append(sock)
        time.sleep(0.05)  # in order, so the proxy admits them in order
    replies: list[str | None] = [None] * len(socks)
    errors = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        ready, _, _ = select.select([icmp, *socks], [], [], max(0.0, deadline - time.monotonic()))
        for sock in ready:
            if sock is icmp:
                data, addr = icmp.recvfrom(2048)
                if data[0] not in (1, 2, 3, 4):
                    continue  # neighbour discovery and echo: not errors
                invoking = data[8:]
                udp = invoking[40:48]
                sport, dport = struct.unpack("!HH", udp[:4]) if len(udp) >= 4 else (0, 0)
                errors.append({"type": data[0], "code": data[1], "from": addr[0],
                               "sport": sport, "dport": dport,
                               "payload": invoking[48:].decode(errors="replace")})
            else:
                try:
                    data = sock.recv(65535)
                except OSError as exc:
                    data = f"error {exc.errno}".encode()
                replies[socks.index(sock)] = data.decode(errors="replace")
    print(json.dumps({"replies": replies, "icmp": errors,
                      "ports": [s.getsockname()[1] for s in socks]}))


if __name__ == "__main__":
    if sys.argv[1] == "echo":
        echo(sys.argv[2], int(sys.argv[3]))
    else:
        pledge(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5:])
