"""joinproxyd.toml validation: every error names the key and the reason."""

import subprocess
import sys
from pathlib import Path

import pytest

from joinproxyd.config import ConfigError, Limits, load, parse

REPO = Path(__file__).resolve().parent.parent
MINIMAL = {"backbone": {"interface": "bb0"}, "join": [{"interfaces": ["join*"]}]}


def with_(**tables):  # type: ignore[no-untyped-def]
    data = {**MINIMAL}
    data.update(tables)
    return data


def error(data) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        parse(data)
    return str(info.value)


def test_minimal_config_gets_sane_defaults():
    config = parse(MINIMAL)
    assert config.backbone == "bb0"
    assert config.joins[0].modes == ("circuit",)
    assert config.joins[0].port == 8443
    assert config.metrics_listen == ("::1", 9465)
    assert config.limits == Limits()
    assert config.discovery == ("static", "grasp", "mdns")


def test_join_spec_matching_by_glob_and_order():
    config = parse(with_(join=[{"interfaces": ["join0"], "modes": ["nat66"]},
                               {"interfaces": ["join*", "lan?"], "port": 4443}]))
    assert config.join_spec_for("join0").modes == ("nat66",)
    assert config.join_spec_for("join7").port == 4443
    assert config.join_spec_for("lan1").port == 4443
    assert config.join_spec_for("lan10") is None
    assert config.join_spec_for("bb0") is None


@pytest.mark.parametrize(("data", "message"), [
    (with_(limits={"circuits_per_pledge": -1}),
     "limits.circuits_per_pledge: must be an integer between 1 and 100000 (got -1)"),
    (with_(limits={"circuits_per_pledge": True}),
     "limits.circuits_per_pledge: must be an integer between 1 and 100000 (got True)"),
    (with_(limits={"idle_timeout": "soon"}),
     "limits.idle_timeout: must be a number between 0.1 and 86400 (got 'soon')"),
    (with_(limits={"circuits_per_plege": 3}), "limits.circuits_per_plege: unknown key"),
    (with_(colour="blue"), "colour: unknown key"),
    ({"backbone": {"interface": "bb0"}, "join": "lan0"},
     "join: must be a list of [[join]] tables"),
    ({"join": [{"interfaces": ["j*"]}]}, "backbone.interface: is required"),
    (with_(join=[{"interfaces": ["join*"], "modes": ["teleport"]}]),
     "join[0].modes: 'teleport' is not one of circuit, nat66, ipip, coaps, jpy, cojp"),
    (with_(join=[{"interfaces": []}]),
     "join[0].interfaces: must be a non-empty list of strings (got [])"),
    (with_(join=[{"interfaces": ["join0"], "port": 70000}]),
     "join[0].port: must be an integer between 1 and 65535 (got 70000)"),
    (with_(join=[{"interfaces": ["b*"]}]),
     "backbone.interface: 'bb0' also matches a [[join]] interface pattern"),
    (with_(metrics={"listen": "localhost"}),
     "metrics.listen: must look like [::1]:9465 or 127.0.0.1:9465 (got 'localhost')"),
    (with_(registrars={"static": [{"address": "fe80::1", "port": 443}]}),
     "registrars.static[0].address: a link-local registrar cannot be configured statically; "
     "use a ULA or global address"),
    (with_(registrars={"static": [{"address": "fd00::10", "jpy_port": 0}]}),
     "registrars.static[0].jpy_port: must be an integer between 1 and 65535 (got 0)"),
    (with_(registrars={"static": [{"address": "registrar.example"}]}),
     "registrars.static[0].address: must be an IPv6 address (got 'registrar.example')"),
    (with_(registrars={"discovery": ["static"]}),
     "registrars.static: is empty and discovery is static only: the proxy would have no "
     "registrar"),
    (with_(registrars={"discovery": ["grasp", "carrier-pigeon"]}),
     "registrars.discovery: 'carrier-pigeon' is not one of static, grasp, mdns, coap"),
    (with_(daemon={"log_level": "loud"}),
     "daemon.log_level: must be one of debug, info, warning, error (got 'loud')"),
    (with_(announce={"grasp": "yes"}), "announce.grasp: must be true or false (got 'yes')"),
])
def test_errors_name_key_and_reason(data, message):
    assert error(data) == message


def test_metrics_can_be_turned_off():
    assert parse(with_(metrics={"listen": ""})).metrics_listen is None
    assert parse(with_(metrics={"listen": "127.0.0.1:9100"})).metrics_listen == ("127.0.0.1",
                                                                                9100)


def test_load_reports_bad_toml_and_missing_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)
    with pytest.raises(ConfigError, match="No such file"):
        load(tmp_path / "missing.toml")


def check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "joinproxyd", "--check-config", str(path)],
                          capture_output=True, text=True, timeout=30)


def test_check_config_cli(tmp_path):
    shipped = check(REPO / "packaging/joinproxyd.toml")
    assert (shipped.returncode, shipped.stdout) == (0, "ok\n")
    bad = tmp_path / "j.toml"
    bad.write_text('[backbone]\ninterface = "bb0"\n[[join]]\ninterfaces = ["j*"]\n'
                   '[limits]\nidle_timeout = 0\n')
    done = check(bad)
    assert done.returncode == 78  # EX_CONFIG: the unit's RestartPreventExitStatus=
    assert done.stderr == (f"{bad}: limits.idle_timeout: must be a number between 0.1 and "
                           "86400 (got 0)\n")


def test_daemon_refuses_to_start_on_a_bad_config(tmp_path):
    bad = tmp_path / "j.toml"
    bad.write_text("[backbone]\n")
    done = subprocess.run([sys.executable, "-m", "joinproxyd", "--config", str(bad)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 78  # EX_CONFIG: systemd must not restart it
    assert done.stderr.strip() == f"joinproxyd: {bad}: backbone.interface: is required"


@pytest.mark.parametrize(("modes", "routable", "announced"), [
    (("circuit",), (), ("fe80::1",)),
    (("circuit",), ("fd00::1",), ("fe80::1",)),
    (("nat66",), ("fd00::1",), ("fd00::1",)),
    (("nat66", "circuit"), ("fd00::2", "fd00::1"), ("fe80::1", "fd00::1")),
    (("nat66",), (), ()),  # nothing this link's pledges could use: not announced at all
])
def test_announced_addresses_follow_the_modes(modes, routable, announced):
    from joinproxyd.daemon import announced_addresses

    assert announced_addresses(modes, "fe80::1", routable) == announced


def test_the_open_file_limit_is_raised_and_a_shortfall_is_reported(tmp_path):
    script = (
        "import logging, resource\n"
        "from joinproxyd.cli import raise_fd_limit\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1024))\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "print(raise_fd_limit(100, logging.getLogger()))\n"
        "print(raise_fd_limit(1000, logging.getLogger()))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1024", "1024"]
    assert done.stderr.count("needs about") == 1  # 100 circuits fit, 1000 do not
    assert "limits.circuits_total = 1000 needs about 2256 open files" in done.stderr
