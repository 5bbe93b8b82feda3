"""Registrar and MASA configuration: every error names the key and the reason; --check-config."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lab.registrar_setup import write_configs
from registrar.config import load_registrar_config
from registrar.masa_config import load_masa_config
from registrar.store import SCHEMA_VERSION
from registrar.tomlconfig import ConfigError, ListenAddress, parse_host_port


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cfg")
    done = subprocess.run([sys.executable, "-m", "brski.cli.pki", "init", str(root / "pki"),
                           "--serial", "SN-1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return write_configs(root / "pki", root / "out", registrar_listen=["[::1]:8443"])


def edited(path: Path, tmp_path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert re.search(old, text, re.M), f"{old!r} not in {path}"
    out = tmp_path / path.name
    out.write_text(re.sub(old, new, text, count=1, flags=re.M))
    return out


def registrar_error(configs, tmp_path, old: str, new: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_registrar_config(edited(configs[0], tmp_path, old, new))
    return str(info.value)


def test_written_configs_load(configs):
    registrar = load_registrar_config(configs[0])
    assert registrar.listen == [ListenAddress("::1", 8443)]
    assert registrar.announce_port == 8443
    assert list(registrar.masa_overrides) == ["masa.example:9443"]
    masa = load_masa_config(configs[1])
    assert list(masa.devices) == ["SN-1"]
    assert len(masa.signer_chain) == 2  # signer, then the MASA CA for the pledges


@pytest.mark.parametrize(("old", "new", "message"), [
    (r"^listen = .*$", 'listen = ["[::1]"]', "server.listen[0]: '[::1]': expected"),
    (r"^listen = .*$", 'listen = ["[::1]:99999"]', "server.listen[0]: '[::1]:99999': port"),
    (r"^listen = .*$", 'listen = ["[nonsense]:1"]', "not an IPv6 address"),
    (r"^listen = .*$", "listen = []", "server.listen: needs at least one address"),
    (r"^key = .*registrar.key\"$", 'key = "/nonexistent.key"',
     "server.key: /nonexistent.key: no such file"),
    (r"^key = .*registrar.key\"$", lambda c: f'key = "{c.parent / "registrar-chain.pem"}"',
     "not an unencrypted PEM private key"),
    (r"^\[server\]$", "[server]\nlisen = 1", "server.lisen: unknown key"),
    (r"^timeout = .*$", 'timeout = "soon"', "masa.timeout: must be a number, not a string"),
    (r"^retry_after = .*$", "retry_after = 600", "masa.retry_after: 600 is above the maximum"),
    (r"^mdns = .*$", "mdns = 1", "announce.mdns: must be true or false, not an integer"),
    (r"^interfaces = .*$", 'interfaces = ["nosuchif0"]',
     "announce.interfaces[0]: 'nosuchif0': no such network interface"),
    (r"^address = .*$", 'address = "[::1]:1"\nurl = "https://x"',
     "give either address or url"),
    (r"^address = .*$", 'url = "http://x"', "must be an https:// URL"),
    (r"^level = .*$", 'level = "chatty"', "log.level: 'chatty' is not one of"),
    (r"^\[pledges\]$", '[pledges]\nenroll = "allowlist"',
     'pledges.serials: empty: with enroll = "allowlist" no pledge can enroll'),
])
def test_registrar_errors_name_the_key(configs, tmp_path, old, new, message):
    if callable(new):
        new = new(configs[0])
    assert message in registrar_error(configs, tmp_path, old, new)


def test_a_key_that_does_not_belong_to_the_certificate(configs, tmp_path):
    text = configs[0].read_text()
    key_line = next(line for line in text.splitlines() if line.startswith("key = "))
    ca_key = next(line for line in text.splitlines() if "domain/ca.key" in line)
    out = tmp_path / "registrar.toml"
    out.write_text(text.replace(key_line, ca_key, 1))
    with pytest.raises(ConfigError, match=r"server\.key: private key does not belong"):
        load_registrar_config(out)


def test_toml_syntax_error_names_the_file(tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text("[server\nlisten = 1\n")
    with pytest.raises(ConfigError, match=r"r\.toml: not valid TOML"):
        load_registrar_config(bad)


def test_masa_errors_name_the_key(configs, tmp_path):
    bad = edited(configs[1], tmp_path, r'^mode = "table"$', 'mode = "tofu"\nextra = 1')
    with pytest.raises(ConfigError, match=r"ownership\.extra: unknown key"):
        load_masa_config(bad)
    bad = edited(configs[1], tmp_path, r'^"SN-1" = .*$', '"SN-1" = "missing.crt"')
    with pytest.raises(ConfigError, match=r'ownership.devices.SN-1: .*missing.crt: no such'):
        load_masa_config(bad)
    bad = edited(configs[1], tmp_path, r'^"SN-1" = .*$', "")
    with pytest.raises(ConfigError, match=r"ownership\.devices: empty"):
        load_masa_config(bad)


@pytest.mark.parametrize(("text", "expected"), [
    ("[fe80::1%eth0]:8443", ("fe80::1%eth0", 8443)),
    ("[::]:1", ("::", 1)),
    ("0.0.0.0:443", ("0.0.0.0", 443)),
    ("masa.example:9443", ("masa.example", 9443)),
])
def test_listen_addresses(text, expected):
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["::1:80", "[::1]", "[fe80::1%]:80", "host:0", "[::1]:http"])
def test_bad_listen_addresses(text):
    with pytest.raises(ValueError):
        parse_host_port(text)


def test_check_config_exit_codes(configs, tmp_path):
    for module, path in (("registrar.cli", configs[0]), ("registrar.masa_cli", configs[1])):
        ok = subprocess.run([sys.executable, "-m", module, "--config", str(path),
                             "--check-config"], capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert "configuration OK" in ok.stdout
    bad = edited(configs[0], tmp_path, r"^grasp = .*$", 'grasp = "yes"')
    done = subprocess.run([sys.executable, "-m", "registrar.cli", "--config", str(bad),
                           "--check-config"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 78  # EX_CONFIG: the units' RestartPreventExitStatus=
    assert done.stderr.strip() == (f"brski-registrar: {bad}: announce.grasp: must be true or "
                                   "false, not a string")


def test_a_port_in_use_is_a_clear_error(configs, tmp_path):
    import socket

    with socket.socket(socket.AF_INET6) as holder:
        holder.bind(("::1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cfg = edited(configs[0], tmp_path, r"^listen = .*$", f'listen = ["[::1]:{port}"]')
        cfg.write_text(cfg.read_text().replace(str(configs[0].parent / "registrar.db"),
                                               str(tmp_path / "r.db")))
        done = subprocess.run([sys.executable, "-m", "registrar.cli", "--config", str(cfg)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert f"cannot listen on [::1]:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_newer_store_stops_the_registrar_with_the_reason(configs, tmp_path):
    import sqlite3

    from registrar.store import Store

    db = tmp_path / "registrar.db"
    Store(db, "registrar").close()
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 7")
    cfg = tmp_path / "registrar.toml"
    cfg.write_text(configs[0].read_text().replace(str(configs[0].parent / "registrar.db"),
                                                  str(db)))
    done = subprocess.run([sys.executable, "-m", "registrar.cli", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert ("registrar.db: schema version 7 is newer than this registrar understands "
            f"({SCHEMA_VERSION})") in done.stderr


def test_the_coaps_listener_is_announced_unless_another_port_is_named(configs, tmp_path):
    """[announce] coaps_port defaults to the port [coaps] listen serves (issue 13: one
    registrar announces the CoAPS endpoint it runs), and stays unset without a listener."""
    registrar = configs[0]
    assert load_registrar_config(registrar).announce_coaps_port is None
    with_coaps = tmp_path / "coaps.toml"
    with_coaps.write_text(registrar.read_text() + '\n[coaps]\nlisten = "[::1]:5699"\n')
    assert load_registrar_config(with_coaps).coaps_listen == ("::1", 5699)
    assert load_registrar_config(with_coaps).announce_coaps_port == 5699
