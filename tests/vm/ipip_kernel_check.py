"""The checks of ipip_kernel.sh, run in the proxy's namespace x of the VM: each prints
CHECK name: PASS/FAIL; the exit status is the number of failures."""

import json
import subprocess
import sys
import time

from joinproxyd.kernel import ip6tnl, ndp

failures = 0


def check(name, ok, detail=""):
    global failures
    print(f"CHECK {name}: {'PASS' if ok else 'FAIL'} {detail}".rstrip(), flush=True)
    failures += 0 if ok else 1


def run(*argv, ns=None):
    argv = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def index(name):
    return json.loads(run("ip", "-j", "link", "show", name).stdout)[0]["ifindex"]


# The registrar answers UDP and TCP on [fe80::2%t0]:8443 (echo), like a registrar's port.
ECHO = """
import socket, threading
def udp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("fe80::2", 8443, 0, socket.if_nametoindex("t0")))
    while True:
        data, peer = s.recvfrom(2048); s.sendto(data, peer)
threading.Thread(target=udp, daemon=True).start()
t = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("fe80::2", 8443, 0, socket.if_nametoindex("t0"))); t.listen(8)
while True:
    c, _ = t.accept(); c.sendall(c.recv(4096)); c.close()
"""
PLEDGE = """
import socket, sys
scope = socket.if_nametoindex("eth0")
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.settimeout(3)
u.sendto(b"udp-hello", ("fe80::2", 8443, 0, scope))
assert u.recvfrom(2048)[0] == b"udp-hello"
t = socket.create_connection(("fe80::2%eth0", 8443), timeout=3)
t.sendall(b"tcp-hello"); assert t.recv(4096) == b"tcp-hello"
print("pledge: udp and tcp echoed")
"""

print("kernel", run("uname", "-r").stdout.strip(), flush=True)
check("probe", ip6tnl.probe() is None, str(ip6tnl.probe()))
echo = subprocess.Popen(["ip", "netns", "exec", "r", "python3", "-c", ECHO])
deadline = time.monotonic() + 30  # python starts slowly under TCG
while ":8443" not in run("ss", "-Hlnt", ns="r").stdout and time.monotonic() < deadline:
    time.sleep(0.2)
join, backbone = index("join0"), index("bb0")
# proxy NDP for the registrar's link-local address, as the ipip mode sets it on either path
ndp.write_knobs("join0", ndp.PROXY_KNOBS)
ndp.add_proxy(join, "fe80::2")
spec = ip6tnl.TunnelSpec("join0", join, backbone, "fd00::11", "fd00::100", "fe80::2", (8443,))
before = ip6tnl.stats([join])
ip6tnl.apply(spec)
ip6tnl.apply(spec)  # again: idempotent
filters = run("tc", "filter", "show", "dev", "join0", "ingress").stdout
check("two_filters_per_port", filters.count("action order 1: mirred") == 2, filters)
# ip6ip6 only (IFLA_IPTUN_PROTO 41), not "any", which would also take IPv4 from the registrar
details = run("ip", "-d", "link", "show", ip6tnl.tunnel_name(join)).stdout
check("tunnel_is_ip6ip6_only", "ip6tnl ip6ip6 " in details, details)
done = run("python3", "-c", PLEDGE, ns="p")
check("pledge_udp_tcp_through_tunnel", done.returncode == 0, (done.stdout + done.stderr).strip())
if done.returncode:
    tunnel = ip6tnl.tunnel_name(join)
    for argv, ns in ((("ip", "-s", "link", "show", "t0"), "r"), (("ss", "-ulnt"), "r"),
                     (("nstat", "-a"), "r"), (("ip", "-s", "-d", "link", "show", tunnel), None),
                     (("ip", "-6", "neigh"), "p"), (("nstat", "-a"), "x")):
        out = run(*argv, ns=ns)
        print("+", ns, *argv, "\n", out.stdout, out.stderr, flush=True)
other = run("python3", "-c", "import socket; s = socket.socket(socket.AF_INET6, "
            "socket.SOCK_DGRAM); s.sendto(b'x', ('fe80::2', 9999, 0, "
            "socket.if_nametoindex('eth0')))", ns="p")
after = ip6tnl.stats([join])
relayed = after["tx_packets"] - before["tx_packets"]
delivered = after["rx_packets"] - before["rx_packets"]
# UDP 1 + TCP (SYN, ACK, data, ACK/FIN...) up; the same down; port 9999 is not relayed
check("counters_from_tunnel_stats", relayed >= 4 and delivered >= 4,
      json.dumps({"relayed": relayed, "delivered": delivered}))
check("other_ports_not_relayed", other.returncode == 0
      and ip6tnl.stats([join])["tx_packets"] == after["tx_packets"])
check("ours_lists_it", ip6tnl.ours() == [join], str(ip6tnl.ours()))
# a registrar change: the same tunnel name, the new remote
moved = ip6tnl.TunnelSpec("join0", join, backbone, "fd00::11", "fd00::200", "fe80::2",
                          (8443,))
ip6tnl.apply(moved)
show = run("ip", "-d", "-j", "link", "show", ip6tnl.tunnel_name(join)).stdout
check("registrar_change_replaces_tunnel", "fd00::200" in show, show[:300])
ip6tnl.remove(join)
ip6tnl.remove(join)  # again: nothing left is not an error
left = {
    "link": run("ip", "link", "show", ip6tnl.tunnel_name(join)).returncode == 0,
    "nft": "joinproxyd_ipip" in run("nft", "list", "tables").stdout,
    "filters": "u32" in run("tc", "filter", "show", "dev", "join0", "ingress").stdout,
}
check("clean_removal", not any(left.values()), json.dumps(left))
done = run("python3", "-c", PLEDGE, ns="p")
check("nothing_relayed_after_removal", done.returncode != 0)
spec98 = ip6tnl.TunnelSpec("join0", join, backbone, "fd00::11", "fd00::100", "fe80::2",
                           (8443,), protocol=98)
try:
    ip6tnl.apply(spec98)
    check("protocol_98_refused", False)
except ip6tnl.KernelError as exc:
    check("protocol_98_refused", "only 41" in str(exc), str(exc))
echo.kill()
print(f"failed checks: {failures}")
sys.exit(failures)
