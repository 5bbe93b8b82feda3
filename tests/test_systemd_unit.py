"""The shipped systemd unit: valid for systemd-analyze, Type=notify with a watchdog, hardened."""

import configparser
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "packaging/systemd/joinproxyd.service"


def service_section() -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return dict(parser["Service"])


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    # The unit names /usr/sbin/joinproxyd; point it at this checkout's script so verify can
    # check that the command exists. Man pages are checked by the packaging tests.
    script = Path(sys.executable).parent / "joinproxyd"
    unit = tmp_path / "joinproxyd.service"
    unit.write_text(UNIT.read_text().replace("/usr/sbin/joinproxyd", str(script)))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""


def test_unit_is_notify_with_watchdog_and_reload():
    service = service_section()
    assert service["Type"] == "notify"
    assert int(service["WatchdogSec"]) > 0
    # A wedged daemon gets SIGABRT, then SIGKILL this soon; Restart= brings it back.
    assert 0 < int(service["TimeoutAbortSec"]) <= int(service["WatchdogSec"])
    assert service["Restart"] == "on-failure"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # the last of two: see below


def test_unit_keeps_only_the_capabilities_it_needs():
    service = service_section()
    assert set(service["CapabilityBoundingSet"].split()) <= {
        "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE", "CAP_BPF", "CAP_PERFMON"}
    for option in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                   "ProtectKernelModules", "ProtectControlGroups", "RestrictNamespaces"):
        assert service[option] == "yes", option
    assert service["ProtectSystem"] == "strict"


def test_unit_runs_as_its_user_with_ambient_capabilities_and_bpf():
    """Not root: the capabilities are handed over as ambient ones, and bpf() is allowed
    (it is outside @system-service) for the XDP/tc programs; @privileged is not denied."""
    service = service_section()
    assert service["User"] == service["Group"] == "joinproxyd"
    assert "DynamicUser" not in service  # pinned maps must stay its own across restarts
    caps = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_BPF", "CAP_PERFMON"}
    assert set(service["CapabilityBoundingSet"].split()) == caps
    assert set(service["AmbientCapabilities"].split()) == caps
    filters = [line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
               if line.startswith("SystemCallFilter=")]
    assert "bpf" in filters[0].split() and "@system-service" in filters[0].split()
    assert not any(f.startswith("~") and "@privileged" in f for f in filters)


# -- every unit we ship: an invalid configuration stops, a reload checks first (issue 11) -----

UNITS = {"joinproxyd.service": "joinproxyd", "brski-registrar.service": "registrar.cli",
         "brski-masa.service": "registrar.masa_cli"}


def values(name: str) -> dict[str, list[str]]:
    """Every Key=value of a unit file, repeated keys in order (configparser keeps one)."""
    found: dict[str, list[str]] = {}
    for line in (REPO / "packaging/systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.parametrize("name", sorted(UNITS))
def test_invalid_configuration_is_not_restarted(name, tmp_path):
    """The exit status the program gives an invalid file is one Restart= does not retry."""
    unit = values(name)
    assert unit["Restart"] == ["on-failure"]
    prevent = {int(s) for v in unit.get("RestartPreventExitStatus", []) for s in v.split()}
    assert os.EX_CONFIG in prevent, unit.get("RestartPreventExitStatus")
    # Only the main process's status counts for RestartPreventExitStatus=: a config check in
    # ExecStartPre= exits non-zero and is restarted every RestartSec for ever.
    assert "ExecStartPre" not in unit
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nlisten = 8443\n[backbone]\n")
    done = subprocess.run([sys.executable, "-m", UNITS[name], "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == os.EX_CONFIG, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # one line: key, reason
    assert str(bad) in done.stderr and "Traceback" not in done.stderr


def test_reload_checks_the_file_before_the_signal():
    unit = values("joinproxyd.service")
    config = unit["ExecStart"][0].split("--config ", 1)[1].strip()
    assert unit["ExecReload"] == [f"/usr/sbin/joinproxyd --check-config {config}",
                                  "/bin/kill -HUP $MAINPID"]


@pytest.mark.parametrize("name", ["brski-registrar.service", "brski-masa.service"])
def test_registrar_and_masa_units_are_notify(name):
    unit = values(name)
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]


@pytest.mark.parametrize("module", ["registrar.cli", "registrar.masa_cli"])
def test_invalid_configuration_is_the_units_status_text(module, tmp_path):
    """STATUS= on the notification socket: `systemctl status` shows why it stopped."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nlisten = 8443\n")
    sock_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(30)
        done = subprocess.run([sys.executable, "-m", module, "--config", str(bad)],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "NOTIFY_SOCKET": str(sock_path)})
        message = sock.recv(4096).decode()
    assert done.returncode == os.EX_CONFIG
    assert message.startswith("STATUS=configuration invalid: server.listen:"), message


@pytest.mark.parametrize("name", sorted(UNITS))
def test_every_unit_has_a_memory_ceiling(name):
    """A leak or a flood must not take the router's memory (issue 11): MemoryMax is set, and
    MemoryHigh below it so the unit is reclaimed before it is killed."""
    unit = values(name)
    sizes = {key: unit[key][0] for key in ("MemoryHigh", "MemoryMax")}
    mib = {key: int(value.removesuffix("M")) for key, value in sizes.items()}
    assert 0 < mib["MemoryHigh"] < mib["MemoryMax"] <= 1024, sizes
