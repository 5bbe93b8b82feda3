"""The shipped systemd unit: valid for systemd-analyze, Type=notify with a watchdog, hardened."""

import configparser
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "packaging/systemd/joinproxyd.service"


def service_section() -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return dict(parser["Service"])


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    # The unit names /usr/bin/joinproxyd; point it at this checkout's script so verify can
    # check that the command exists. Man pages are checked by the packaging tests.
    script = Path(sys.executable).parent / "joinproxyd"
    unit = tmp_path / "joinproxyd.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/joinproxyd", str(script)))
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
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"


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
