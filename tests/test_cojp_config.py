"""The registrar's [cojp] table (registrar.cojp_config): defaults, a full table, bad keys."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from brski import cojp
from registrar.cojp_config import CojpConfig, load_cojp_config
from registrar.tomlconfig import ConfigError, Table


def load(text: str) -> CojpConfig:
    root = Table(tomllib.loads(text), "", Path("."))
    return load_cojp_config(root)


def test_absent_table_is_off() -> None:
    assert load("") == CojpConfig()


def test_full_table() -> None:
    conf = load('''
[cojp]
enabled = true
listen = "[::1]:15683"
network_id = "ca-fe"
jrc_address = "fd00::1"
short_id_lease = 24
blacklist = ["00-11-22-33-44-55-66-77"]
join_rate = 0
response_partial_iv = false
[[cojp.link_layer_key]]
key_id = 1
key = "e6bf4287c2d7618d6a9687445ffd33e6"
usage = 1
''')
    assert conf.enabled and conf.listen == ("::1", 15683)
    assert conf.network_id == b"\xca\xfe"
    assert conf.jrc_address == bytes.fromhex("fd00" + "00" * 13 + "01")
    assert conf.blacklist == (bytes.fromhex("0011223344556677"),) and conf.join_rate == 0
    assert conf.link_layer_keys == (cojp.LinkLayerKey(
        1, bytes.fromhex("e6bf4287c2d7618d6a9687445ffd33e6"), key_usage=1),)
    assert not conf.response_partial_iv and conf.short_id_lease == 24


def test_empty_strings_mean_not_set() -> None:
    conf = load('[cojp]\nnetwork_id = ""\njrc_address = ""\n')
    assert conf.network_id is None and conf.jrc_address is None


@pytest.mark.parametrize(("text", "message"), [
    ('listen = "5683"', "cojp.listen: '5683'"),
    ('listen = ""', "cojp.listen: must not be empty"),
    ('network_id = "xyz"', "cojp.network_id: 'xyz' is not hex"),
    ('jrc_address = "10.0.0.1"', "cojp.jrc_address: not an IPv6 address"),
    ('blacklist = ["zz"]', "cojp.blacklist[0]: 'zz'"),
    ("join_rate = -2", "cojp.join_rate: -2 is below the minimum"),
    ("enabled = 1", "cojp.enabled: must be true or false"),
    ("lisen = 1", "cojp.lisen: unknown key"),
    ('[[cojp.link_layer_key]]\nkey_id = 1\nkey = "00"', "link_layer_key[0].key: link-layer "
                                                       "key_value must be 16 bytes"),
    ('[[cojp.link_layer_key]]\nkey = "00"', "link_layer_key[0].key_id: missing"),
    ("[[cojp.link_layer_key]]\nkey_id = 300\nkey = \"00\"", "300 is above the maximum 254"),
])
def test_bad_keys_are_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(f"[cojp]\n{text}\n")
    assert message in str(info.value)


def test_jrc_and_coap_discovery_cannot_share_udp_5683(tmp_path: Path) -> None:
    import subprocess
    import sys

    from lab.registrar_setup import write_configs
    from registrar.config import load_registrar_config

    done = subprocess.run([sys.executable, "-m", "brski.cli.pki", "init", str(tmp_path / "pki"),
                           "--serial", "SN-1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    toml, _ = write_configs(tmp_path / "pki", tmp_path / "out", registrar_listen=["[::1]:8443"],
                            announce_interfaces=["lo"], coaps_listen="[::1]:5684",
                            mdns=False, grasp=False)
    base = toml.read_text()
    toml.write_text(base + '\n[cojp]\nenabled = true\n')
    with pytest.raises(ConfigError, match=r"cojp\.listen: UDP 5683 is also the CoAP discovery"):
        load_registrar_config(toml)
    toml.write_text(base + '\n[cojp]\nenabled = true\nlisten = "[::]:5690"\n')
    assert load_registrar_config(toml).cojp.listen == ("::", 5690)
