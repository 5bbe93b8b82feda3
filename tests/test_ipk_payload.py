"""The OpenWrt package's payload run with only what the package declares (issue 11, defect 1).

`make ipk` is built and unpacked; the daemon is then started from the payload the way its
wrapper does, under Debian's own interpreter with ``-I -S``: no site-packages, so the only
importable code is the standard library (the OpenWrt package python3), what the .ipk ships
(/usr/lib/joinproxyd/python and vendor) and, for each other declared dependency, the Python
modules that OpenWrt package would install (python3-ifaddr: ifaddr, copied into a directory of
its own). Everything else, the nftables binding, cryptography, python3-systemd, must be
un-importable; the first check proves it is. Shared libraries stand in the same way: a
declared libbpf is the host's libbpf.so.1; one test hides it (a bind mount of /dev/null in a
mount namespace of the daemon's own) to see what a router without it shows.

In a namespace lab, with a circuit-only configuration (the guard on, as shipped): the daemon
starts, relays a pledge's connection, and stops cleanly. With nat66 configured it refuses with
one line that says what OpenWrt lacks. Started the OpenWrt way, from a UCI file translated by
the package's init script (joinproxyd --from-uci, run from the payload), it serves the same;
a mistake in the UCI file is one line naming the UCI option.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_ipip_daemon import bpffs, show
from test_packaging import init_script_run

from lab import Lab, Topology, wait_for
from lab.proxyd import ProxyDaemon, base_config, echo_registrar, talk

REPO = Path(__file__).resolve().parent.parent
__all__ = ["bpffs"]  # the fixture, shared with test_ipip_daemon
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, not the venv's: its path has no site-packages

# Each OpenWrt dependency the .ipk may declare -> the top-level Python modules it provides
# (found here in the venv and copied aside); python3 is the standard library itself. A new
# dependency fails test_every_declared_dependency_is_mapped until it is mapped here.
OPENWRT_PYTHON_MODULES: dict[str, tuple[str, ...]] = {
    "libc": (), "python3": (), "python3-ifaddr": ("ifaddr",), "kmod-sched-bpf": (),
    "libbpf": (),  # libbpf.so.1, loaded with ctypes: the host's stands in
    "procd-ujail": (),  # procd's jail (user, capabilities): setpriv stands in
}
# Importable on the build machine, and must not be from the payload.
NOT_SHIPPED = ("nftables", "cryptography", "systemd", "aiocoap", "pytest")


@pytest.fixture(scope="module")
def ipk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    done = subprocess.run(["make", "-s", "ipk"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (package,) = (REPO / "build/ipk").glob("joinproxyd_*.ipk")
    out = tmp_path_factory.mktemp("ipk")
    with tarfile.open(package) as outer:
        outer.extractall(out)  # our own archive, just built
    for part in ("control", "data"):
        (out / part).mkdir()
        with tarfile.open(out / f"{part}.tar.gz") as inner:
            inner.extractall(out / part)
    return out


def declared(ipk: Path) -> list[str]:
    control = (ipk / "control/control").read_text()
    depends = re.search(r"^Depends: (.*)$", control, re.M)
    assert depends is not None
    return [d.strip().split()[0] for d in depends.group(1).split(",")]


@pytest.fixture(scope="module")
def payload(ipk: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The argv that runs the payload's joinproxyd with only what the package declares."""
    work = tmp_path_factory.mktemp("payload")
    site = work / "site-packages"  # what the declared OpenWrt packages would install
    site.mkdir()
    for dep in declared(ipk):
        for module in OPENWRT_PYTHON_MODULES.get(dep, ()):
            spec = importlib.util.find_spec(module)
            assert spec is not None and spec.origin, module
            shutil.copytree(Path(spec.origin).parent, site / module,
                            ignore=shutil.ignore_patterns("__pycache__"))
    data = ipk / "data"
    wrapper = (data / "usr/sbin/joinproxyd").read_text()
    assert "/usr/lib/joinproxyd/python" in wrapper
    head, tail = wrapper.split("\nfrom joinproxyd", 1)
    runner = work / "joinproxyd"
    runner.write_text(head.replace("/usr/lib/joinproxyd", str(data / "usr/lib/joinproxyd"))
                      + f"\nsys.path.append({str(site)!r})\nfrom joinproxyd" + tail)
    return [SYSTEM_PYTHON, "-I", "-S", str(runner)]


def test_every_declared_dependency_is_mapped_and_libbpf_is_declared(ipk: Path) -> None:
    deps = declared(ipk)
    assert set(deps) <= set(OPENWRT_PYTHON_MODULES), \
        f"map {set(deps) - set(OPENWRT_PYTHON_MODULES)} to the Python modules it provides"
    # the guard and the ipip mode load libbpf.so.1 (kernel/bpf.py)
    assert "libbpf" in deps
    feed = (REPO / "packaging/openwrt/joinproxyd/Makefile").read_text()
    assert re.search(r"^\s*DEPENDS:=.*\+libbpf\b", feed, re.M)


def test_the_payload_environment_has_only_what_the_package_declares(
        payload: list[str], ipk: Path) -> None:
    probe = Path(payload[-1]).with_name("probe.py")
    probe.write_text(Path(payload[-1]).read_text().split("\nfrom joinproxyd")[0] + (
        "\nimport importlib.util, json\n"
        f"names = {[*NOT_SHIPPED, 'pyroute2', 'zeroconf', 'ifaddr', 'joinproxyd']!r}\n"
        "found = {n: getattr(importlib.util.find_spec(n), 'origin', None) for n in names}\n"
        "print(json.dumps(found))\n"))
    done = subprocess.run([*payload[:-1], str(probe)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    for name in NOT_SHIPPED:
        assert found[name] is None, f"{name} importable from {found[name]}"
    data = str(ipk / "data/usr/lib/joinproxyd")
    for name in ("pyroute2", "zeroconf", "joinproxyd"):
        assert found[name].startswith(data), (name, found[name])
    assert found["ifaddr"] and "site-packages" in found["ifaddr"]


@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=1, registrars=1), log_dir=tmp_path / "logs") as lab:
        yield lab


def circuit_config(run_dir: Path, bpffs: Path, ipk: Path, **join: object) -> dict:
    """As shipped: circuit mode, the guard on, every discovery and announcement."""
    return base_config(
        run_dir, daemon={"log_level": "info", "bpf_pin_dir": str(bpffs / "joinproxyd")},
        join=[{"interfaces": ["join*"], "modes": ["circuit"], "port": 8443, **join}],
        guard={"enabled": True, "rate": 20, "burst": 40},
        announce={"interval": 1, "mdns": True})


def test_the_payload_starts_serves_and_stops_with_circuit_mode(
        lab: Lab, bpffs: Path, ipk: Path, payload: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "proxy"
    echo_registrar(lab.registrars[0], "r0")
    daemon = ProxyDaemon(lab, run_dir, circuit_config(run_dir, bpffs, ipk), command=payload)
    try:
        daemon.start()
        wait_for(lambda: daemon.ctl()["joining"] or None, 15, "joining open")
        assert talk(lab.pledges[0], "hello").splitlines() == ["r0", "hello"]
        status = daemon.ctl()
        # the guard runs from the payload's own objects (/usr/lib/joinproxyd/bpf)
        assert status["guard"]["running"] and status["guard"]["interfaces"] == \
            {"join0": status["guard"]["interfaces"]["join0"]}, status["guard"]
        assert daemon.metrics()[("joinproxyd_guard_running", frozenset())] == 1
        # a reload that adds nat66 is refused the same way, and the running one serves on
        config = circuit_config(run_dir, bpffs, ipk)
        config["join"][0]["modes"] = ["circuit", "nat66"]
        daemon.reload(config)
        refused = [line for line in daemon.log().splitlines() if "reload refused" in line]
        assert len(refused) == 1 and "nat66 mode cannot run here" in refused[0] \
            and "OpenWrt" in refused[0], refused
        assert list(daemon.ctl()["relays"]) == ["circuit"]
        assert talk(lab.pledges[0], "again").splitlines() == ["r0", "again"]
        daemon.write_config(circuit_config(run_dir, bpffs, ipk))
        assert daemon.stop() == 0
        log = daemon.log()
        assert "Traceback" not in log, log
        assert [line for line in log.splitlines() if line.startswith("ERROR")] == \
            refused, log
        assert not (bpffs / "joinproxyd").exists()
    finally:
        show(daemon)


def test_the_payload_without_libbpf_serves_and_says_the_guard_is_not_running(
        lab: Lab, bpffs: Path, ipk: Path, payload: list[str], tmp_path: Path) -> None:
    """libbpf is declared, but a router may still lack it (installed with --nodeps, removed
    since): the circuit relay serves, and the log and status say the guard is not running
    and which OpenWrt package would run it."""
    cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True,
                           check=True).stdout
    found = re.search(r"^\s*libbpf\.so\.1 \(.*\) => (\S+)$", cache, re.M)
    assert found, "libbpf.so.1 is not in the loader's cache"
    lib = str(Path(found.group(1)).resolve())
    hidden = ["unshare", "-m", "sh", "-c", f"mount --bind /dev/null {lib} && exec \"$@\"",
              "sh", *payload]
    run_dir = tmp_path / "proxy"
    echo_registrar(lab.registrars[0], "r0")
    daemon = ProxyDaemon(lab, run_dir, circuit_config(run_dir, bpffs, ipk), command=hidden)
    try:
        daemon.start()
        wait_for(lambda: daemon.ctl()["joining"] or None, 15, "joining open")
        assert talk(lab.pledges[0], "hello").splitlines() == ["r0", "hello"]
        guard = wait_for(lambda: (g := daemon.ctl()["guard"])["error"] and g, 10,
                         "the guard's error in status")
        assert guard["enabled"] and not guard["running"] and not guard["interfaces"]
        assert "install the OpenWrt package libbpf (opkg install libbpf)" in guard["error"]
        errors = [line for line in daemon.log().splitlines() if line.startswith("ERROR")]
        assert len(errors) == 1 and "opkg install libbpf" in errors[0], errors
        assert "libbpf1" not in daemon.log()  # the Debian name would mislead on a router
        text = lab.proxy.run([sys.executable, "-m", "joinproxyd.ctl", "--socket",
                              str(run_dir / "control.sock"), "status"]).stdout
        assert "guard: NOT RUNNING: the join-port guard cannot run" in text, text
        assert daemon.metrics()[("joinproxyd_guard_running", frozenset())] == 0
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log()
    finally:
        show(daemon)


@pytest.mark.parametrize(("mode", "missing"), [("nat66", "nftables"), ("coaps", "cryptography"),
                                             ("jpy", "cryptography")])
def test_the_payload_refuses_a_mode_with_one_line_naming_what_openwrt_lacks(
        lab: Lab, bpffs: Path, ipk: Path, payload: list[str], tmp_path: Path, mode: str,
        missing: str) -> None:
    run_dir = tmp_path / "proxy"
    run_dir.mkdir()
    config = circuit_config(run_dir, bpffs, ipk)
    config["join"][0]["modes"] = ["circuit", mode]
    daemon = ProxyDaemon(lab, run_dir, config, command=payload)
    done = lab.proxy.run([*payload, "--config", str(daemon.config_path)], check=False,
                         timeout=60)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 78  # EX_CONFIG: procd/systemd must not respawn it
    assert len(lines) == 1, lines
    assert mode in lines[0] and missing in lines[0] and "OpenWrt" in lines[0], lines
    assert "python3-nftables" not in lines[0] and "python3-openssl" not in lines[0]  # Debian's
    assert "Traceback" not in done.stderr
    # The init script's start and reload check the file first: the check says the same.
    checked = lab.proxy.run([*payload, "--check-config", str(daemon.config_path)],
                            check=False, timeout=60)
    assert checked.returncode == 78, checked
    assert mode in checked.stderr and "OpenWrt" in checked.stderr, checked.stderr
    assert checked.stdout.strip() != "ok"


def uci_file(run_dir: Path, bpffs: Path, port: str = "8443") -> str:
    """circuit_config() as an operator would write it in /etc/config/joinproxyd."""
    return f"""
config daemon 'daemon'
	option log_level 'info'
	option control_socket '{run_dir}/control.sock'
	option drain_seconds '1'
	option bpf_pin_dir '{bpffs}/joinproxyd'

config metrics 'metrics'
	option listen '[::1]:9465'

config backbone 'backbone'
	option interface 'bb0'

config join 'pledges'
	list interface 'join*'
	list mode 'circuit'
	option port '{port}'

config registrars 'registrars'
	list discovery 'static'
	option health_interval '0.3'
	option health_timeout '0.3'

config registrar 'lab'
	option address 'fd4a:5044::100'
	option port '8443'
	option preference '10'

config announce 'announce'
	option interval '1'
	option mdns '1'

config guard 'guard'
	option enabled '1'
	option rate '20'
	option burst '40'
"""


def test_the_payload_starts_from_a_uci_file_through_the_init_script(
        lab: Lab, bpffs: Path, ipk: Path, payload: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "proxy"
    run_dir.mkdir()
    script = ipk / "data/etc/init.d/joinproxyd"
    recorded = init_script_run(script, tmp_path, uci_file(run_dir, bpffs), "start_service",
                               daemon=payload)
    generated = tmp_path / "var/etc/joinproxyd.toml"
    command = "param command T/joinproxyd --config T/var/etc/joinproxyd.toml"
    assert command in recorded and recorded[-1] == "status 0", recorded
    echo_registrar(lab.registrars[0], "r0")
    # What procd runs: the payload with the generated file.
    daemon = ProxyDaemon(lab, run_dir, tomllib.loads(generated.read_text()), command=payload)
    daemon.config_path = generated
    try:
        daemon.start()
        wait_for(lambda: daemon.ctl()["joining"] or None, 15, "joining open")
        assert talk(lab.pledges[0], "hello").splitlines() == ["r0", "hello"]
        assert daemon.ctl()["guard"]["running"]
        # uci commit: translated again, then procd's reload_signal (SIGHUP) reloads it
        recorded = init_script_run(script, tmp_path, uci_file(run_dir, bpffs, "9443"),
                                   "reload_service", daemon=payload)
        assert recorded[-2:] == ["start", "status 0"], recorded
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: [i["port"] for i in daemon.ctl()["interfaces"]] == [9443] or None,
                 10, "join port 9443 after the reload")
        assert talk(lab.pledges[0], "again", port=9443).splitlines() == ["r0", "again"]
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log() and "ERROR" not in daemon.log(), daemon.log()
    finally:
        show(daemon)
    # A mistake: one line naming the UCI option, the generated file left as it was.
    before = generated.read_text()
    broken = tmp_path / "broken"
    broken.write_text(uci_file(run_dir, bpffs, "84 43"))
    done = subprocess.run([*payload, "--from-uci", str(broken), "--write-config",
                           str(generated)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 78 and done.stdout == "", done
    assert done.stderr.splitlines() == [
        f"joinproxyd: {broken}:17: joinproxyd.pledges.port: must be a whole number "
        "(got '84 43')"], done.stderr
    assert generated.read_text() == before


JAIL_UID = 64123  # no user of the build machine: procd's `user joinproxyd` stands in
CAPABILITIES = REPO / "packaging/openwrt/joinproxyd/files/joinproxyd.capabilities"
CAP_NUMBERS = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_PERFMON": 38, "CAP_BPF": 39}


def jail_argv(capabilities: Path = CAPABILITIES) -> list[str]:
    """procd's user, capabilities (procd's JSON) and no_new_privs, as setpriv applies them."""
    caps = json.loads(capabilities.read_text())
    assert set(caps) == {"bounding", "effective", "ambient", "permitted", "inheritable"}
    assert all(caps[name] == caps["ambient"] for name in caps)  # one set, kept across exec
    wanted = ",".join(["-all"] + [f"+{c.removeprefix('CAP_').lower()}"
                                  for c in caps["ambient"]])
    return ["setpriv", f"--reuid={JAIL_UID}", f"--regid={JAIL_UID}", "--clear-groups",
            f"--inh-caps={wanted}", f"--ambient-caps={wanted}", f"--bounding-set={wanted}",
            "--no-new-privs", "--"]


@pytest.fixture
def jail_dir(as_root: None) -> Iterator[Path]:
    """A directory the unprivileged daemon can reach (pytest's own are root-only), with a bpf
    filesystem of its own; removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="jp-jail-"))
    base.chmod(0o755)
    (base / "bpffs").mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(base / "bpffs")], check=True)
    try:
        yield base
    finally:
        subprocess.run(["umount", "-l", str(base / "bpffs")], check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_the_payload_serves_jailed_as_procd_runs_it(
        lab: Lab, ipk: Path, payload: list[str], jail_dir: Path, tmp_path: Path) -> None:
    """procd's user, capabilities (the shipped JSON) and no_new_privs, applied with setpriv:
    the daemon, not root and with only those capabilities, starts with the guard, relays
    and stops; what the init script prepares (run and pin directories) is all it needs."""
    # the payload, readable by the jailed user
    shutil.copytree(ipk / "data", jail_dir / "data", symlinks=True)
    site = Path(payload[-1]).parent / "site-packages"
    shutil.copytree(site, jail_dir / "site-packages")
    runner = jail_dir / "joinproxyd"
    runner.write_text(Path(payload[-1]).read_text()
                      .replace(str(ipk / "data"), str(jail_dir / "data"))
                      .replace(str(site), str(jail_dir / "site-packages")))
    subprocess.run(["chmod", "-R", "a+rX", str(jail_dir / "data"),
                    str(jail_dir / "site-packages"), str(runner)], check=True)
    # what start_service prepares: the run directory and the pin directory, the user's own
    run_dir, pins = jail_dir / "run", jail_dir / "bpffs/joinproxyd"
    for directory in (run_dir, pins):
        directory.mkdir()
        os.chown(directory, JAIL_UID, JAIL_UID)
    uci = jail_dir / "joinproxyd.uci"
    uci.write_text(uci_file(run_dir, jail_dir / "bpffs"))
    generated = jail_dir / "joinproxyd.toml"
    done = subprocess.run([*payload[:-1], str(runner), "--from-uci", str(uci),
                           "--write-config", str(generated)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    jail = jail_argv(ipk / "data/etc/capabilities/joinproxyd.json")
    echo_registrar(lab.registrars[0], "r0")
    daemon = ProxyDaemon(lab, tmp_path / "proxy", tomllib.loads(generated.read_text()),
                         command=[*jail, *payload[:-1], str(runner)])
    daemon.config_path = generated
    try:
        daemon.start(wait_ready=False)  # its notify socket is root's; the status says it

        def joining() -> bool | None:
            assert daemon.process and daemon.process.popen.poll() is None, daemon.log()
            return ((run_dir / "control.sock").exists() and daemon.ctl()["joining"]) or None

        wait_for(joining, 20, "joining open")
        status = Path(f"/proc/{daemon.ctl()['pid']}/status").read_text()
        assert re.search(rf"^Uid:\s+{JAIL_UID}\s", status, re.M), status
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
        effective = int(re.search(r"^CapEff:\s+(\w+)$", status, re.M)[1], 16)
        shipped = json.loads((ipk / "data/etc/capabilities/joinproxyd.json").read_text())
        assert effective == sum(1 << CAP_NUMBERS[c] for c in shipped["effective"]), \
            hex(effective)
        assert talk(lab.pledges[0], "hello").splitlines() == ["r0", "hello"]
        guard = daemon.ctl()["guard"]
        assert guard["running"] and list(guard["interfaces"]) == ["join0"], guard
        assert daemon.metrics()[("joinproxyd_guard_running", frozenset())] == 1
        assert daemon.stop() == 0
        log = daemon.log()
        assert "Traceback" not in log and "ERROR" not in log and "WARNING" not in log, log
    finally:
        show(daemon)
