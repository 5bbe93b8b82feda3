"""OpenWrt's UCI file translated to joinproxyd.toml (daemon/joinproxyd/uci.py): the format
(quoting, comments, lists, anonymous sections), every TOML table the daemon reads, the shipped
default (serves nothing), and one clear line per malformed input naming the UCI option."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from joinproxyd import config as config_module
from joinproxyd import uci

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "packaging/openwrt/joinproxyd/files/joinproxyd.config"

EVERYTHING = """\
package joinproxyd
# every section the daemon reads
config daemon 'daemon'
	option log_level 'debug'
	option control_socket '/var/run/joinproxyd/control.sock'
	option drain_seconds '2.5'
	option bpf_pin_dir '/sys/fs/bpf/jp'
	option bpf_object_dir "/usr/lib/joinproxyd/bpf"
config metrics
	option listen ''
config backbone 'backbone'
	option interface wan   # a bare word, then a comment
config join 'lan'
	list interface 'br-lan'
	list interface "lan\\"x"
	list mode 'circuit'
	list mode 'nat66'
	option port '8443'
config join 'off'
	option enabled 'no'
	list interface 'guest'
config join
	option interface 'iot*'
	list mode 'ipip'
	option port 443
config registrars 'registrars'
	list discovery 'static'
	list discovery 'grasp'
	option health_interval '3'
	option health_timeout '0.5'
config registrar 'r1'
	option address 'fd00::10'
	option port '443'
	option preference '10'
	option ipip_link_local 'fe80::1234'
	list ipip_protocol '41'
	list ipip_protocol '98'
	list ipip_port '443'
config registrar
	option enabled '0'
	option address 'not even an address'
config limits
	option circuits_total '10'
	option circuits_per_interface '5'
	option circuits_per_pledge '2'
	option new_circuits_per_second '0.5'
	option new_circuits_burst '3'
	option connect_timeout '1'
	option idle_timeout '30'
	option circuit_lifetime '60'
config announce
	option interval '5'
	option grasp 'on'
	option mdns 'off'
config guard
	option enabled 'true'
	option rate '7'
	option burst '9'
	option syn_rate '3'
	option syn_burst '4'
config ipip
	option protocol '98'
	option backbone_prefix 'fd00::1:0/112'
	list backbone_address 'iot0=fd00::2:1'
	option xdp 'off'
"""


def translated(text: str, tmp_path: Path) -> dict:
    source = tmp_path / "joinproxyd"
    source.write_text(text)
    translation = uci.load_uci(source)
    toml = uci.toml_text(translation.data, str(source))
    assert tomllib.loads(toml) == translation.data  # what is written reads back the same
    return translation.data


def error(text: str, tmp_path: Path) -> str:
    source = tmp_path / "joinproxyd"
    source.write_text(text) if isinstance(text, str) else source.write_bytes(text)
    with pytest.raises(uci.UciError) as caught:
        uci.load_uci(source)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(source)), message
    return message.removeprefix(str(source))


def test_every_section_maps_to_the_daemons_toml(tmp_path: Path) -> None:
    data = translated(EVERYTHING, tmp_path)
    assert data["daemon"] == {"log_level": "debug",
                              "control_socket": "/var/run/joinproxyd/control.sock",
                              "drain_seconds": 2.5, "bpf_pin_dir": "/sys/fs/bpf/jp",
                              "bpf_object_dir": "/usr/lib/joinproxyd/bpf"}
    assert data["metrics"] == {"listen": ""}
    assert data["backbone"] == {"interface": "wan"}
    assert data["join"] == [  # the disabled one left out, order kept (first match wins)
        {"interfaces": ["br-lan", 'lan"x'], "modes": ["circuit", "nat66"], "port": 8443},
        {"interfaces": ["iot*"], "modes": ["ipip"], "port": 443}]
    assert data["registrars"] == {
        "discovery": ["static", "grasp"], "health_interval": 3.0, "health_timeout": 0.5,
        "static": [{"address": "fd00::10", "port": 443, "preference": 10,
                    "ipip": {"link_local": "fe80::1234", "protocols": [41, 98],
                             "ports": [443]}}]}
    assert data["limits"]["new_circuits_per_second"] == 0.5
    assert data["limits"]["circuits_total"] == 10
    assert data["announce"] == {"interval": 5.0, "grasp": True, "mdns": False}
    assert data["guard"] == {"enabled": True, "rate": 7, "burst": 9, "syn_rate": 3,
                             "syn_burst": 4}
    assert data["ipip"] == {"protocol": 98, "backbone_prefix": "fd00::1:0/112",
                            "backbone_addresses": {"iot0": "fd00::2:1"}, "xdp": "off"}
    parsed = config_module.parse(data)
    assert parsed.metrics_listen is None and parsed.static_registrars[0].ipip is not None
    assert parsed.ipip.backbone_addresses == {"iot0": "fd00::2:1"}


def test_every_toml_key_the_daemon_reads_has_a_uci_option() -> None:
    """A key added to config.py's table list (its docstring) without a UCI option fails."""
    mapped = {(kind, key.split(".")[-1]) for kind, schema in uci.SECTIONS.items()
              for key, _ in schema.values() if key}
    listed: dict[str, str] = {}
    table = ""
    (tables,) = [p for p in (config_module.__doc__ or "").split("\n\n") if "[daemon]" in p]
    for line in tables.splitlines():
        head = re.match(r"\s*\[\[?(\w+)\]\]?\s", line)
        if head:
            table = head.group(1)
            line = line[head.end():]
        listed[table] = listed.get(table, "") + " " + re.sub(r"\(.*?\)", "", line)
    checked = 0
    for table, text in listed.items():
        for word in re.findall(r"[a-z_]+", text.split("[")[0] if table != "registrars"
                               else text):
            kind = table
            if table == "registrars" and word in ("address", "port", "preference", "ipip",
                                                  "link_local", "protocols", "ports",
                                                  "coaps_port", "jpy_port", "cojp_port"):
                kind = "registrar"  # registrars.static[]: one config registrar each
            if word == "ipip" or (table == "registrars" and word in ("static", "grasp", "mdns")):
                continue  # a sub-table, or the discovery methods' names
            assert (kind, word) in mapped, f"[{table}] {word}: no UCI option"
            checked += 1
    assert checked >= 35, listed  # every table's keys were read


def test_the_shipped_file_enables_no_join_link_and_translates_once_enabled(
        tmp_path: Path) -> None:
    text = SHIPPED.read_text()
    source = tmp_path / "joinproxyd"
    source.write_text(text)
    with pytest.raises(uci.NothingToServe, match="no join link is enabled"):
        uci.load_uci(source)
    data = translated(text.replace("option enabled '0'", "option enabled '1'"), tmp_path)
    assert data["join"] == [{"interfaces": ["br-lan"], "modes": ["circuit"], "port": 8443}]
    assert data["backbone"] == {"interface": "wan"} and data["guard"]["enabled"] is True


def test_config_file_runs_a_toml_file_as_written_and_nothing_else_is_allowed(
        tmp_path: Path) -> None:
    toml = tmp_path / "own.toml"
    toml.write_text((REPO / "packaging/joinproxyd.toml").read_text())
    text = f"config daemon 'daemon'\n\toption config_file '{toml}'\n"
    source = tmp_path / "joinproxyd"
    source.write_text(text)
    assert uci.load_uci(source).config_file == toml
    assert "config backbone (joinproxyd.backbone, line 3) would be ignored" in error(
        text + "config backbone 'backbone'\n\toption interface 'wan'\n", tmp_path)
    assert "joinproxyd.daemon.log_level would be ignored" in error(
        text + "\toption log_level 'info'\n", tmp_path)
    toml.write_text("[backbone]\ninterface = 'wan'\n[limits]\nidle_timeout = 0\n")
    assert error(text, tmp_path) == f": config_file {toml}: limits.idle_timeout: must be a " \
        "number between 0.1 and 86400 (got 0)"
    toml.unlink()
    assert error(text, tmp_path) == f": config_file {toml}: No such file or directory"


@pytest.mark.parametrize(("text", "expected"), [
    # syntax
    ("config join 'lan\n", ":1: unterminated single quote"),
    ('config join "lan\n', ":1: unterminated double quote"),
    ("config join lan\\\n", ":1: a line ending in a backslash is not supported"),
    ("option port '1'\n", ":1: option before the first config section"),
    ("config\n", ":1: expected config <type> ['<name>']"),
    ("config join a b\n", ":1: expected config <type> ['<name>']"),
    ("config join 'la-n'\n", ":1: 'la-n' is not a section name"),
    ("config joins\n", ":1: config joins: unknown section type"),
    ("frobnicate x\n", ":1: expected config, option or list (got 'frobnicate')"),
    ("package other\n", ":1: expected 'package joinproxyd'"),
    ("config join 'lan'\n\toption port\n", ":2: joinproxyd.lan: expected option <name>"),
    ("config join 'lan'\n\toption port 1 2\n", ":2: joinproxyd.lan: expected option <name>"),
    ("config join 'lan'\nconfig join 'lan'\n",
     ":2: joinproxyd.lan: the section name is used twice (also line 1)"),
    ("config guard\nconfig guard\n", ":2: config guard: only one such section is allowed"),
    ("config join 'lan'\n\toption prot '1'\n", ":2: joinproxyd.lan.prot: unknown option "
                                              "(config join takes: enabled, interface"),
    ("config join\n\toption port '1'\n\toption port '2'\n",
     ":3: joinproxyd.@join[0].port: given twice (also line 2)"),
    ("config join\n\tlist interface 'a'\n\toption interface 'b'\n",
     ":3: joinproxyd.@join[0].interface: given twice"),
    ("config join\n\tlist port '1'\n", ":2: joinproxyd.@join[0].port: takes one value"),
    # values
    ("config join 'lan'\n\toption port 'x'\n",
     ":2: joinproxyd.lan.port: must be a whole number (got 'x')"),
    ("config join 'lan'\n\toption port '0x10'\n", ":2: joinproxyd.lan.port: must be a whole"),
    ("config join 'lan'\n\toption enabled 'maybe'\n",
     ":2: joinproxyd.lan.enabled: must be 1 or 0"),
    ("config limits\n\toption connect_timeout 'nan'\n",
     ":2: joinproxyd.@limits[0].connect_timeout: must be a number (got 'nan')"),
    ("config limits\n\toption connect_timeout '1e999'\n",
     ":2: joinproxyd.@limits[0].connect_timeout: must be a number"),
    ("config ipip\n\tlist backbone_address 'iot0'\n",
     ":2: joinproxyd.@ipip[0].backbone_address: must be '<join link>=<IPv6 address>'"),
    ("config ipip\n\tlist backbone_address 'a=fd00::1'\n\tlist backbone_address "
     "'a=fd00::2'\n", ":2: joinproxyd.@ipip[0].backbone_address: a is given twice"),
    ("config daemon\n\toption config_file 'relative.toml'\n",
     ":2: joinproxyd.@daemon[0].config_file: must be an absolute path"),
])
def test_malformed_files_are_refused_with_one_line(text: str, expected: str,
                                                   tmp_path: Path) -> None:
    assert error(text, tmp_path).startswith(expected), error(text, tmp_path)


JOIN = "config backbone\n\toption interface 'wan'\nconfig join 'lan'\n\tlist interface 'br-lan'\n"


@pytest.mark.parametrize(("text", "expected"), [
    # the daemon's own checks, said in UCI's names with the line that set the value
    (JOIN + "\toption port '70000'\n",
     ":5: joinproxyd.lan.port: must be an integer between 1 and 65535 (got 70000)"),
    (JOIN + "\tlist mode 'tunnel'\n", ":5: joinproxyd.lan.mode: 'tunnel' is not one of"),
    (JOIN + "config limits 'limits'\n\toption circuits_per_pledge '-1'\n",
     ":6: joinproxyd.limits.circuits_per_pledge: must be an integer between 1 and 100000"),
    (JOIN + "config registrar 'r'\n\toption address 'fe80::1'\n",
     ":6: joinproxyd.r.address: a link-local registrar cannot be configured"),
    (JOIN + "config registrar 'r'\n\toption address 'fd00::1'\n\toption ipip_link_local "
     "'fd00::2'\n", ":7: joinproxyd.r.ipip_link_local: must be a link-local"),
    (JOIN + "config daemon\n\toption log_level 'loud'\n",
     ":6: joinproxyd.@daemon[0].log_level: must be one of debug, info"),
    (JOIN + "config ipip\n\tlist backbone_address 'br-lan=fe80::1'\n",
     ":6: joinproxyd.@ipip[0].backbone_address: must be a unicast ULA or global address"),
    (JOIN.replace("'br-lan'", "'wan'"),
     ":2: joinproxyd.@backbone[0].interface: 'wan' also matches a [[join]]"),
    ("config join 'lan'\n\tlist interface 'br-lan'\n",
     ": joinproxyd.@backbone[0].interface: is required"),
    ("config backbone\n\toption interface 'wan'\nconfig join 'lan'\n\tlist mode 'circuit'\n",
     ":3: joinproxyd.lan.interface: is required"),
    (JOIN + "config registrar 'r'\n\toption port '443'\n",
     ":5: joinproxyd.r.address: is required"),
    (JOIN + "config registrar 'r'\n\toption address 'fd00::1'\n\toption ipip_address "
     "'fd00::2'\n", ":5: joinproxyd.r.ipip_link_local: is required"),
    (JOIN + "\tlist mode 'ipip'\n",
     ": joinproxyd.@ipip[0].backbone_prefix: is required when a [[join]] uses ipip"),
])
def test_the_daemons_checks_name_the_uci_option(text: str, expected: str,
                                                tmp_path: Path) -> None:
    assert error(text, tmp_path).startswith(expected), error(text, tmp_path)


@pytest.mark.parametrize("text", ["", "# only a comment\n\n", "package joinproxyd\n",
                                  "config backbone\n\toption interface 'wan'\n"])
def test_a_file_without_a_join_section_serves_nothing(text: str, tmp_path: Path) -> None:
    source = tmp_path / "joinproxyd"
    source.write_text(text)
    with pytest.raises(uci.NothingToServe, match="no join link is enabled"):
        uci.load_uci(source)


def test_oversized_binary_and_missing_files_are_refused(tmp_path: Path) -> None:
    assert "too large for a configuration" in error("#" * (uci.MAX_BYTES + 1), tmp_path)
    assert error(b"config join\n\toption port '\xff'\n", tmp_path) == ":2: not UTF-8 text"
    assert "NUL character" in error("config join\n\toption port '1\x002'\n", tmp_path)
    with pytest.raises(uci.UciError, match="No such file or directory"):
        uci.load_uci(tmp_path / "absent")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "joinproxyd", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_cli_writes_the_toml_prints_its_path_and_refuses_with_one_line(
        tmp_path: Path) -> None:
    source, out = tmp_path / "joinproxyd", tmp_path / "var/etc/joinproxyd.toml"
    source.write_text(JOIN)
    done = run_cli("--from-uci", str(source), "--write-config", str(out))
    assert done.returncode == 0 and done.stdout == f"{out}\n" and done.stderr == ""
    assert run_cli("--check-config", str(out)).stdout.strip() == "ok"
    assert out.stat().st_mode & 0o777 == 0o644
    written = out.read_text()
    # a broken edit leaves the last good TOML (what the running daemon reloads) alone
    source.write_text(JOIN + "\toption port 'eighty'\n")
    done = run_cli("--from-uci", str(source), "--write-config", str(out))
    assert done.returncode == 78 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"joinproxyd: {source}:5: joinproxyd.lan.port: must be a whole number (got 'eighty')"]
    assert out.read_text() == written
    # no enabled join link: its own status, so reload can stop a running daemon
    source.write_text(JOIN + "\toption enabled '0'\n")
    done = run_cli("--from-uci", str(source), "--write-config", str(out))
    assert done.returncode == 69 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "nothing to serve" in done.stderr
    done = run_cli("--write-config", str(out))
    assert done.returncode == 2 and "--write-config goes with --from-uci" in done.stderr
