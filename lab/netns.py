"""Thin wrappers over iproute2 for the lab: namespaces, links, addresses, sysctls.

The lab shells out to `ip` on purpose: it is test scaffolding, every command it runs can be
pasted into a shell to reproduce a topology by hand, and it keeps the daemon's own netlink
code (pyroute2, in joinproxyd.kernel) the only netlink code under test.
"""

import contextlib
import ctypes
import json
import os
import subprocess
import time
from collections.abc import Iterator, Sequence


class LabError(Exception):
    """The lab could not build, inspect or remove a topology."""


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 30) -> str:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]}: not installed (run 'make setup')") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)}: timed out after {timeout} s") from exc
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout


def ip(ns: str | None, *args: str, check: bool = True) -> str:
    prefix = ["ip", "-n", ns] if ns else ["ip"]
    return run([*prefix, *args], check=check)


def list_namespaces() -> list[str]:
    out = run(["ip", "-j", "netns", "list"], check=False).strip()
    if not out:
        return []
    return [entry["name"] for entry in json.loads(out)]


def add_namespace(ns: str) -> None:
    run(["ip", "netns", "add", ns])
    # Before any link exists, so every link made later inherits them: no DAD (addresses are
    # usable at once) and no kernel-made link-local addresses (the lab assigns its own).
    for key, value in (
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
        ("net.ipv6.conf.all.addr_gen_mode", "1"),
        ("net.ipv6.conf.default.addr_gen_mode", "1"),
        ("net.ipv6.conf.all.forwarding", "0"),
        ("net.ipv6.conf.default.accept_ra", "0"),
        ("net.ipv6.conf.all.accept_ra", "0"),
    ):
        sysctl(ns, key, value)
    ip(ns, "link", "set", "lo", "up")


def namespace_pids(ns: str) -> list[int]:
    out = run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def delete_namespace(ns: str) -> None:
    run(["ip", "netns", "del", ns], check=False)


def sysctl(ns: str, key: str, value: str) -> None:
    run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"])


def add_veth(ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
    # Created straight into both namespaces: the names never exist in the caller's namespace.
    ip(None, "link", "add", name_a, "netns", ns_a, "type", "veth", "peer", "name", name_b,
       "netns", ns_b)


def add_bridge(ns: str, name: str) -> None:
    # No multicast snooping: with no MLD querier on the link, snooping would eat the GRASP
    # and mDNS multicast that discovery depends on.
    ip(ns, "link", "add", name, "type", "bridge", "mcast_snooping", "0", "stp_state", "0")
    ip(ns, "link", "set", name, "up")


def enslave(ns: str, port: str, bridge: str) -> None:
    ip(ns, "link", "set", port, "master", bridge)
    ip(ns, "link", "set", port, "up")


def add_address(ns: str, ifname: str, cidr: str) -> None:
    ip(ns, "-6", "addr", "add", cidr, "dev", ifname, "nodad")


def link_up(ns: str, ifname: str) -> None:
    ip(ns, "link", "set", ifname, "up")


def links(ns: str) -> list[dict]:
    return json.loads(ip(ns, "-j", "link", "show") or "[]")


def addresses(ns: str) -> list[dict]:
    return json.loads(ip(ns, "-j", "-6", "addr", "show") or "[]")


def wait_settled(ns: str, ifnames: Sequence[str], timeout: float = 10) -> None:
    """Wait until every named link is up with carrier and no address is tentative."""
    deadline = time.monotonic() + timeout
    while True:
        pending = []
        for link in links(ns):
            if link["ifname"] in ifnames and link.get("operstate") != "UP":
                pending.append(f"{link['ifname']} has no carrier")
        for link in addresses(ns):
            for addr in link.get("addr_info", []):
                if addr.get("tentative"):
                    pending.append(f"{addr['local']} on {link['ifname']} is tentative")
        if not pending:
            return
        if time.monotonic() > deadline:
            raise LabError(f"namespace {ns} did not settle: {'; '.join(pending)}")
        time.sleep(0.02)


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def thread_in_namespace(ns: str) -> Iterator[None]:
    """Move the calling thread into namespace `ns` for the block, then back.

    Netlink sockets, /proc/sys/net and BPF_PROG_TEST_RUN's ifindex lookups follow the thread,
    so this lets a test drive kernel interfaces of a lab namespace in-process.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise LabError(f"setns {ns}: {os.strerror(ctypes.get_errno())}")
        yield
    finally:
        libc.setns(saved, CLONE_NEWNET)
        os.close(saved)
        os.close(target)


def ifindex(ns: str, ifname: str) -> int:
    return int(json.loads(ip(ns, "-j", "link", "show", "dev", ifname))[0]["ifindex"])
