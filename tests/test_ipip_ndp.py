"""kernel/ndp.py against a real kernel, in a namespace of the test's own: proxy entries and
backbone addresses carry joinproxyd's mark, an operator's are told apart and left alone,
and the per-link knobs are read, set and reported by name."""

from __future__ import annotations

import errno
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from joinproxyd.kernel import KernelError, ndp
from lab.netns import ifindex, thread_in_namespace

pytestmark = pytest.mark.netns


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


@pytest.fixture
def ns(as_root: None) -> Iterator[str]:
    name = f"jpnd{secrets.token_hex(4)}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "add", "join0", "type", "veth", "peer", "name", "bb0")
        for dev in ("join0", "bb0"):
            sh("ip", "-n", name, "link", "set", dev, "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_proxy_entries_are_marked_and_idempotent(ns: str) -> None:
    join0 = ifindex(ns, "join0")
    sh("ip", "-n", ns, "-6", "neigh", "add", "proxy", "fe80::99", "dev", "join0")  # operator's
    with thread_in_namespace(ns):
        ndp.add_proxy(join0, "fe80::1234")
        ndp.add_proxy(join0, "fe80::1234%join0")  # again, scoped: still one entry
        assert ndp.proxies() == [(join0, "fe80::1234")]
        assert ndp.del_proxy(join0, "fe80::1234") is True
        assert ndp.del_proxy(join0, "fe80::1234") is False
        assert ndp.proxies() == []
    assert "fe80::99 dev join0 proxy" in sh("ip", "-n", ns, "-6", "neigh", "show", "proxy")


def test_addresses_are_marked_and_an_operators_are_not_ours(ns: str) -> None:
    bb0 = ifindex(ns, "bb0")
    sh("ip", "-n", ns, "addr", "add", "fd00::7/64", "dev", "bb0", "nodad")
    with thread_in_namespace(ns):
        assert ndp.add_address(bb0, "fd00::1:2") is True
        assert ndp.add_address(bb0, "fd00::1:2") is False, "present: not added twice"
        # The operator's address (any prefix length): used as it is, not ours to remove.
        assert ndp.add_address(bb0, "fd00::7") is False
        assert (bb0, "fd00::7", False) in ndp.addresses()
        assert [(i, a) for i, a, mine in ndp.addresses() if mine] == [(bb0, "fd00::1:2")]
        assert ndp.del_address(bb0, "fd00::1:2") is True
        assert ndp.del_address(bb0, "fd00::1:2") is False
        assert [a for a in ndp.addresses() if a[2]] == []
        with pytest.raises(KernelError, match=r"ifindex 99999: add address fd00::5/128: ENODEV"):
            ndp.add_address(99999, "fd00::5")
    out = sh("ip", "-n", ns, "-6", "addr", "show", "dev", "bb0")
    assert "fd00::7/64" in out and "fd00::1:2" not in out


def test_knobs_are_set_and_restored(ns: str) -> None:
    with thread_in_namespace(ns):
        before = ndp.read_knobs("join0")
        assert before == {"proxy_ndp": "0", "forwarding": "0", "proxy_delay": "80"}
        assert ndp.write_knobs("join0", ndp.PROXY_KNOBS) == []
        assert ndp.read_knobs("join0") == ndp.PROXY_KNOBS
        ndp.write_knobs("join0", before)
        assert ndp.read_knobs("join0") == before
        assert Path("/proc/sys/net/ipv6/conf/all/forwarding").read_text().strip() == "0"


def test_a_read_only_proxy_delay_is_skipped_and_the_rest_is_required(tmp_path: Path) -> None:
    conf = tmp_path / "net/ipv6/conf/eth0.100"  # dotted name: a path, not a sysctl key
    conf.mkdir(parents=True)
    for knob in ("proxy_ndp", "forwarding"):
        (conf / knob).write_text("0\n")
    assert ndp.read_knobs("eth0.100", tmp_path) == {"proxy_ndp": "0", "forwarding": "0"}
    skipped = ndp.write_knobs("eth0.100", ndp.PROXY_KNOBS, tmp_path)
    assert len(skipped) == 1 and "proxy_delay=0: ENOENT" in skipped[0]
    assert (conf / "proxy_ndp").read_text() == "1\n"
    (conf / "forwarding").unlink()
    with pytest.raises(KernelError) as info:
        ndp.read_knobs("eth0.100", tmp_path)
    assert info.value.errno == errno.ENOENT and "eth0.100/forwarding" in str(info.value)
    with pytest.raises(ValueError, match="not an interface name"):
        ndp.read_knobs("../all", tmp_path)
