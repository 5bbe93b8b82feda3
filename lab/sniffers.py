"""What a lab host hears of a join proxy's announcements on its link."""

from __future__ import annotations

# Run on a lab host with `python -c GRASP_SNIFFER [IFNAME]` (default eth0): every GRASP
# datagram to ff02::13 port 7017 on that link, one line each, "<arrival time> <hex>", until
# it is stopped.
GRASP_SNIFFER = """
import socket, struct, sys, time
ifname = sys.argv[1] if len(sys.argv) > 1 else "eth0"
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 7017))
group = socket.inet_pton(socket.AF_INET6, "ff02::13")
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
             group + struct.pack("@I", socket.if_nametoindex(ifname)))
while True:
    data = s.recv(2048)
    print(time.time(), data.hex(), flush=True)
"""


def heard(log: str) -> list[tuple[float, bytes]]:
    """The sniffer's lines as (arrival time, datagram), oldest first; a line still being
    written is left out."""
    out = []
    for line in log.splitlines():
        fields = line.split()
        if len(fields) == 2:
            try:
                out.append((float(fields[0]), bytes.fromhex(fields[1])))
            except ValueError:
                continue
    return out
