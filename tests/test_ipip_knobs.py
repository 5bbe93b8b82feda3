"""The record of the join links' sysctls from before the ipip mode (relays/ipip_knobs.py):
what a file may hold, that it is written whole and removed when empty, that a missing,
corrupt or unreadable one is logged and set aside without stopping anything, and, in a
namespace of the test's own, that a link that vanished (or was made again under its name)
is never written to."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from joinproxyd.config import parse
from joinproxyd.relays import ipip_knobs
from joinproxyd.relays.ipip_knobs import KnobRecord, Saved
from lab.netns import ifindex, thread_in_namespace

LOG = logging.getLogger("test.ipip_knobs")
BEFORE = {"proxy_ndp": "0", "forwarding": "0", "proxy_delay": "40"}


def record(tmp_path: Path) -> KnobRecord:
    return KnobRecord(tmp_path / "run" / "ipip-knobs.json", LOG)


# -- the file -----------------------------------------------------------------------------------

def test_the_record_lives_beside_the_control_socket() -> None:
    config = parse({"backbone": {"interface": "bb0"},
                    "daemon": {"control_socket": "/run/jp-test/ctl.sock"},
                    "join": [{"interfaces": ["join*"], "modes": ["ipip"]}],
                    "ipip": {"backbone_prefix": "fd4a:5044::1:0/112"}})
    assert config.ipip.knob_record == Path("/run/jp-test/ipip-knobs.json")
    default = parse({"backbone": {"interface": "bb0"}, "join": [{"interfaces": ["join*"]}]})
    assert default.ipip.knob_record == Path("/run/joinproxyd/ipip-knobs.json")


def test_saved_whole_private_and_removed_when_empty(tmp_path: Path) -> None:
    rec = record(tmp_path)
    links = {"join0": Saved(7, BEFORE), "lan.100": Saved(12, {"proxy_ndp": "1",
                                                               "forwarding": "0"})}
    assert rec.save(links) is True
    assert stat.S_IMODE(rec.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(rec.path.parent.stat().st_mode) == 0o700
    assert json.loads(rec.path.read_text()) == {"version": 1, "links": {
        "join0": {"ifindex": 7, "knobs": BEFORE},
        "lan.100": {"ifindex": 12, "knobs": {"proxy_ndp": "1", "forwarding": "0"}}}}
    assert rec.load() == links
    assert sorted(p.name for p in rec.path.parent.iterdir()) == ["ipip-knobs.json"], \
        "no temporary file is left"
    assert rec.save({"join0": Saved(7, BEFORE)}) and set(rec.load()) == {"join0"}
    assert rec.save({}) is True
    assert not rec.path.exists()
    assert rec.save({}) is True, "removing what is not there is fine"
    assert rec.error is None


def test_a_missing_record_is_empty_and_says_nothing(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        assert record(tmp_path).load() == {}
    assert caplog.records == []


@pytest.mark.parametrize(("content", "why"), [
    ("{\"version\": 1, \"links\": {\"join0\": ", "not JSON"),
    ("", "not JSON"),
    (json.dumps({"version": 2, "links": {}}), "not a version 1 record"),
    (json.dumps([1, 2]), "not a version 1 record"),
    (json.dumps({"version": 1, "links": []}), '"links" is not a table'),
    (json.dumps({"version": 1, "links": {"../all": {"ifindex": 1, "knobs": BEFORE}}}),
     "'../all' is not an interface name"),
    (json.dumps({"version": 1, "links": {"join0": {"ifindex": 0, "knobs": BEFORE}}}),
     "join0: ifindex 0 is not a positive integer"),
    (json.dumps({"version": 1, "links": {"join0": {"ifindex": True, "knobs": BEFORE}}}),
     "join0: ifindex True is not a positive integer"),
    (json.dumps({"version": 1, "links": {"join0": {"ifindex": 3, "knobs": {}}}}),
     "join0: no knobs"),
    (json.dumps({"version": 1, "links": {"join0": {"ifindex": 3,
                                                   "knobs": {"accept_ra": "2"}}}}),
     "join0: 'accept_ra' is not a knob the ipip mode changes"),
    (json.dumps({"version": 1, "links": {"join0": {"ifindex": 3,
                                                   "knobs": {"forwarding": "1\n0"}}}}),
     "join0: forwarding = '1\\n0' is not an integer value"),
    (json.dumps({"version": 1, "links": {"join0": {"ifindex": 3,
                                                   "knobs": {"forwarding": 0}}}}),
     "join0: forwarding = 0 is not an integer value"),
])
def test_a_corrupt_record_is_logged_set_aside_and_empty(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str, why: str) -> None:
    rec = record(tmp_path)
    rec.path.parent.mkdir()
    rec.path.write_text(content)
    with caplog.at_level(logging.ERROR):
        assert rec.load() == {}
    (message,) = [r.getMessage() for r in caplog.records]
    assert str(rec.path) in message and why in message, message
    assert "cannot be restored" in message and "kept as" in message
    aside = rec.path.with_name("ipip-knobs.json.corrupt")
    assert aside.read_text() == content, "kept for the operator"
    assert not rec.path.exists()
    # the next change writes a good record again
    assert rec.save({"join0": Saved(3, BEFORE)}) and rec.load() == {"join0": Saved(3, BEFORE)}


def test_an_unreadable_record_is_logged_and_empty(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    rec = record(tmp_path)
    rec.path.mkdir(parents=True)  # reading a directory fails (EISDIR) even for root
    with caplog.at_level(logging.ERROR):
        assert rec.load() == {}
    (message,) = [r.getMessage() for r in caplog.records]
    assert "cannot be read: EISDIR" in message, message


def test_a_record_that_cannot_be_written_is_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "run").write_text("a file where the directory should be")
    rec = record(tmp_path)
    with caplog.at_level(logging.ERROR):
        assert rec.save({"join0": Saved(3, BEFORE)}) is False
        assert rec.save({"join0": Saved(3, BEFORE), "join1": Saved(4, BEFORE)}) is False
    assert rec.error is not None and "cannot write" in rec.error
    assert len(caplog.records) == 1, "once per distinct failure"
    assert "restored by a clean stop, but not after a crash" in caplog.records[0].getMessage()


def test_the_status_view() -> None:
    assert ipip_knobs.as_status({"join1": Saved(4, {"forwarding": "0"}),
                                 "join0": Saved(3, BEFORE)}) == \
        {"join0": BEFORE, "join1": {"forwarding": "0"}}


# -- links that vanished, in a namespace ------------------------------------------------------

def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def knobs(ns: str, link: str) -> dict[str, str]:
    return {knob: sh("ip", "netns", "exec", ns, "sysctl", "-n",
                     f"net.ipv6.{'neigh' if knob == 'proxy_delay' else 'conf'}.{link}.{knob}")
            .strip() for knob in BEFORE}


@pytest.fixture
def ns(as_root: None) -> Iterator[str]:
    name = f"jpkn{secrets.token_hex(4)}"
    sh("ip", "netns", "add", name)
    try:
        for link in ("join0", "join1"):
            sh("ip", "-n", name, "link", "add", link, "type", "veth", "peer", f"x{link}")
            for knob in ("proxy_ndp", "forwarding"):
                sh("ip", "netns", "exec", name, "sysctl", "-qw",
                   f"net.ipv6.conf.{link}.{knob}=1")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.netns
def test_only_the_recorded_links_still_there_are_restored(
        ns: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """join0 is the recorded link; join1 was deleted and made again (another ifindex);
    join2 is gone. Only join0 gets its values back; the record is removed."""
    join0, join1 = ifindex(ns, "join0"), ifindex(ns, "join1")
    sh("ip", "-n", ns, "link", "del", "join1")
    sh("ip", "-n", ns, "link", "add", "join1", "type", "veth", "peer", "xjoin1")
    sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.join1.forwarding=1")
    assert ifindex(ns, "join1") != join1
    rec = record(tmp_path)
    rec.save({"join0": Saved(join0, BEFORE), "join1": Saved(join1, BEFORE),
              "join2": Saved(join1 + 100, BEFORE)})
    with thread_in_namespace(ns), caplog.at_level(logging.INFO):
        asyncio.run(ipip_knobs.restore_leftovers(rec.path, LOG))
    assert knobs(ns, "join0") == BEFORE
    assert knobs(ns, "join1")["forwarding"] == "1", "the new join1 is not the recorded one"
    assert knobs(ns, "join1")["proxy_delay"] != "40"
    assert not rec.path.exists()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "join0: sysctls from before an earlier run restored (forwarding=0, proxy_delay=40, " \
        "proxy_ndp=0)" in text, text
    assert "join1: gone since an earlier run recorded its sysctls" in text
    assert "join2: gone since an earlier run recorded its sysctls" in text


@pytest.mark.netns
def test_a_link_that_cannot_be_restored_stays_recorded(ns: str, tmp_path: Path) -> None:
    join0 = ifindex(ns, "join0")
    rec = record(tmp_path)
    # a value the kernel refuses (EINVAL: beyond an int) stands for any failed write
    rec.save({"join0": Saved(join0, {"forwarding": "9999999999"}),
              "join1": Saved(ifindex(ns, "join1"), BEFORE)})
    with thread_in_namespace(ns):
        asyncio.run(ipip_knobs.restore_leftovers(rec.path, LOG))
    assert knobs(ns, "join1") == BEFORE
    assert set(rec.load()) == {"join0"}, "kept for the next start to try again"
