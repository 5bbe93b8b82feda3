"""Optional capabilities named in the platform's words (kernel/features.py), and the clsact
record's parser (kernel/qdisc_record.py): pure code, no namespaces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from joinproxyd.kernel import features
from joinproxyd.kernel.qdisc_record import QdiscRecord, parse


def test_the_package_marker_wins_over_etc(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "debian_version").write_text("12.8\n")
    marker = tmp_path / "PACKAGED_FOR"
    assert features.detect(marker, etc) == features.DEBIAN
    marker.write_text("openwrt\n")
    assert features.detect(marker, etc) == features.OPENWRT
    marker.write_text("something else\n")  # not a platform: ignored
    assert features.detect(marker, etc) == features.DEBIAN
    (etc / "openwrt_release").write_text("DISTRIB_ID='OpenWrt'\n")
    assert features.detect(marker, etc) == features.OPENWRT
    assert features.detect(tmp_path / "none", tmp_path / "nothing") == features.OTHER


def test_install_hints_name_each_platforms_package() -> None:
    assert features.install_hint("libbpf", features.OPENWRT) == (
        "libbpf.so.1 is missing: install the OpenWrt package libbpf (opkg install libbpf)")
    assert features.install_hint("libbpf", features.DEBIAN) == (
        "libbpf.so.1 is missing: install the Debian package libbpf1 (apt install libbpf1)")
    assert "python3-nftables" in features.install_hint("nftables-binding", features.DEBIAN)
    openwrt = features.install_hint("nftables-binding", features.OPENWRT)
    assert "no OpenWrt package provides it" in openwrt and "nftables-json" in openwrt
    assert "python3-nftables" not in openwrt
    assert features.install_hint("libnftables", features.OPENWRT).endswith(
        "(opkg install nftables-json)")
    assert features.install_hint("libbpf", features.OTHER) == "libbpf.so.1 is missing"


def test_missing_for_asks_only_the_configured_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def absent(name: str):  # type: ignore[no-untyped-def]
        def probe() -> str:
            asked.append(name)
            return f"{name} is missing"
        return probe

    monkeypatch.setattr(features, "_NEEDS", {"nat66": (absent("nftables"),),
                                             "ipip": (absent("libbpf"),)})
    assert features.missing_for(["circuit"]) is None and asked == []
    assert features.missing_for(["circuit", "nat66"]) == \
        "the nat66 mode cannot run here: nftables is missing"
    assert features.missing_for(["ipip"]) == "the ipip mode cannot run here: libbpf is missing"


def test_here_the_probes_find_what_the_build_machine_has() -> None:
    # make setup installs python3-nftables and libbpf1: both probes must say "present"
    assert features.nftables_problem() is None
    assert features.libbpf_problem() is None
    assert features.missing_for(["circuit", "nat66", "ipip"]) is None


def record(qdiscs: object, version: object = 1) -> str:
    return json.dumps({"version": version, "qdiscs": qdiscs})


def test_the_clsact_record_round_trips(tmp_path: Path) -> None:
    rec = QdiscRecord(tmp_path / "clsact.json")
    assert rec.load() == {}
    rec.claim(7, "join0")
    rec.claim(3, "bb0")
    assert parse((tmp_path / "clsact.json").read_text()) == {3: "bb0", 7: "join0"}
    assert QdiscRecord(tmp_path / "clsact.json").load() == {3: "bb0", 7: "join0"}
    rec.keep_only({7: "join0", 3: "renamed"})  # a new link under an old ifindex
    assert rec.claims == {7: "join0"}
    rec.withdraw(7)
    assert not (tmp_path / "clsact.json").exists()


@pytest.mark.parametrize("text", [
    "", "[]", "not json", record({}, version=2), json.dumps({"version": 1}),
    record({"x": "join0"}), record({"0": "join0"}), record({"-1": "join0"}),
    record({"4294967296": "join0"}), record({"٣": "join0"}), record({"7": ""}),
    record({"7": "a" * 16}), record({"7": "../etc"}), record({"7": 7}),
])
def test_a_forged_or_broken_record_claims_nothing(tmp_path: Path, text: str) -> None:
    with pytest.raises(ValueError):
        parse(text)
    path = tmp_path / "clsact.json"
    path.write_text(text)
    assert QdiscRecord(path).load() == {}  # logged; nothing is taken for ours
