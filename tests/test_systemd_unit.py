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
