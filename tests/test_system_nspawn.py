"""The .deb packages installed with apt and run by a real systemd, as border router and registrar
of a namespace lab.

    pledge0 ─ join0 ┐                               ┌ registrar container (systemd, PID 1):
    pledge1 ─ join0 ┤ proxy container (systemd):    │   brski-masa.service, brski-registrar.service
                    └ joinproxyd.service ─ bb0 ─────┘   from brski-registrar_*.deb

Every test runs once per supported Debian release (RELEASES: Debian 12 bookworm, Debian 13
trixie), with the packages built for that release (make deb, build/deb/<release>/). Both
containers boot a rootfs of the release with systemd-nspawn, each in a lab namespace (the
proxy's and registrar0's), so their interfaces are the lab's join links and backbone. The
packages are installed inside with ``apt-get install ./*.deb``: apt resolves the Debian
dependencies from the rootfs's apt cache (tools/nspawn-rootfs.sh, which also makes and caches
the rootfs). The test then drives systemd as an operator would: start, is-active, the
journal (startup line, structured relay fields), /metrics, reload (SIGHUP), a pledge-sim
enrollment through the installed daemon to the installed registrar, the watchdog (a stopped
daemon is restarted), and stop (no nftables table, BPF program or socket left). The packages
of one release are refused by apt on the other.

Recipe, flags and traps: ../shared/docs/systemd-container.md. Needs root, systemd-nspawn and
debootstrap (make setup), and the Debian mirror the first time (rootfs, about a minute per
release). A summary (timings, systemd-analyze security scores) is written to
build/nspawn/report-<release>.txt.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import Lab, Topology, wait_for
from lab.proxyd import toml

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build"
CACHE = BUILD / "nspawn"
# The Debian releases the packages are built for and tested on (packaging/debian/vendor.py).
RELEASES = ["bookworm", "trixie"]
PY = sys.executable
PREFIX = "jpsys-"  # container names, cgroups and run directories of this test
REGISTRAR = "fd4a:5044::100"
PORT = 8443
# Commands run in a container get this environment, not pytest's (venv, pyenv, PIP_*).
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "TERM": "dumb",
             "DEBIAN_FRONTEND": "noninteractive", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""}

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="boots containers and namespaces: needs root"),
]


class ContainerError(AssertionError):
    pass


class Container:
    """A booted systemd-nspawn container whose network namespace is a lab namespace.

    nspawn runs without machined and without a host systemd (--register=no --keep-unit), from
    a cgroup of its own in both hierarchies (two containers must not share /payload), with a
    volatile overlay (the cached rootfs stays pristine) and a bpffs of its own at /sys/fs/bpf.
    Commands run through nsenter with a clean environment; files are read and written through
    /proc/<PID 1>/root.
    """

    def __init__(self, name: str, rootfs: Path, netns: str, run_dir: Path,
                 binds: dict[Path, str]) -> None:
        self.name = name
        self.rootfs = rootfs
        self.netns = netns
        self.run_dir = run_dir
        self.binds = binds
        self.bpffs = run_dir / "bpffs"
        self.log_path = run_dir / "console.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.leader = 0

    # -- life cycle ---------------------------------------------------------------------------
    def _join_cgroup(self) -> None:  # runs in the child, before exec
        for hierarchy in ("systemd", "unified"):
            base = Path("/sys/fs/cgroup") / hierarchy
            if base.is_dir():
                (base / self.name).mkdir(exist_ok=True)
                (base / self.name / "cgroup.procs").write_text(str(os.getpid()))

    def boot(self) -> Container:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.bpffs.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "bpf", "bpf", str(self.bpffs)], check=True)
        argv = ["systemd-nspawn", "-q", "-b", "-D", str(self.rootfs), "-M", self.name,
                "--register=no", "--keep-unit", "--volatile=overlay",
                # --private-network makes /proc/sys/net writable and keeps CAP_NET_ADMIN;
                # with --network-namespace-path alone neither holds (systemd-container.md).
                f"--network-namespace-path=/run/netns/{self.netns}", "--private-network",
                # Not in nspawn's default set / seccomp allow-list: a unit's CAP_BPF would be
                # dropped silently and bpf() would fail with EPERM.
                "--capability=CAP_NET_ADMIN,CAP_BPF,CAP_PERFMON",
                "--system-call-filter=bpf perf_event_open",
                f"--bind={self.bpffs}:/sys/fs/bpf",
                *[f"--bind-ro={host}:{inside}" for host, inside in self.binds.items()],
                "--setenv=SYSTEMD_COLORS=0", "--console=read-only",
                "--", "systemd.show_status=false", "systemd.mask=console-getty.service"]
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=self._join_cgroup)
        return self

    def wait_running(self, timeout: float = 60) -> None:
        def leader() -> int:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise ContainerError(f"{self.name}: nspawn exited {self.popen.returncode}:\n"
                                     f"{self.console()}")
            children = Path(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children")
            for pid in children.read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return int(pid)
            return 0

        self.leader = wait_for(leader, timeout, f"{self.name}: systemd as PID 1")

        def running() -> bool:
            state = self.sh("systemctl is-system-running", check=False).stdout.strip()
            return state in ("running", "degraded")

        wait_for(running, timeout, f"{self.name}: systemd finished booting", interval=0.1)

    def console(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Halt the container (SIGTERM to nspawn halts it cleanly), then remove what nspawn
        leaves behind: its cgroups, the bpffs mount, the propagation directory."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        cleanup_leftovers(self.name, self.bpffs)

    # -- inside -------------------------------------------------------------------------------
    def sh(self, script: str, *, check: bool = True, timeout: float = 120,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["nsenter", "-t", str(self.leader), "-a", "--", "/bin/sh", "-c",
                               script], capture_output=True, text=True, env=CLEAN_ENV,
                              timeout=timeout, input=input, check=False)
        if check and done.returncode != 0:
            raise ContainerError(f"{self.name}: `{script}` exited {done.returncode}:\n"
                                 f"{done.stderr[-3000:]}\n(stdout:) {done.stdout[-2000:]}")
        return done

    def path(self, inside: str) -> Path:
        return Path(f"/proc/{self.leader}/root") / inside.lstrip("/")

    def show(self, unit: str, prop: str) -> str:
        return self.sh(f"systemctl show -P {prop} {unit}").stdout.strip()

    def journal(self, unit: str, *, output: str = "cat") -> str:
        return self.sh(f"journalctl --no-pager -o {output} -u {unit}").stdout

    def unit_host_pids(self, unit: str) -> list[int]:
        """The unit's processes as the host sees them (bpftool reports host PIDs)."""
        procs = (Path("/sys/fs/cgroup/unified") / self.name / "payload/system.slice" / unit
                 / "cgroup.procs")
        with contextlib.suppress(OSError):
            return [int(p) for p in procs.read_text().split()]
        return []


def cleanup_leftovers(name: str, bpffs: Path | None = None) -> None:
    for hierarchy in ("systemd", "unified"):
        top = Path("/sys/fs/cgroup") / hierarchy / name
        if top.is_dir():
            for directory in sorted((p for p in top.rglob("*") if p.is_dir()),
                                    key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    directory.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()
    shutil.rmtree(f"/run/systemd/nspawn/propagate/{name}", ignore_errors=True)
    if bpffs is not None and os.path.ismount(bpffs):
        subprocess.run(["umount", str(bpffs)], check=False)


def nspawn_pids(name: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if argv[0].endswith(b"systemd-nspawn") and name.encode() in argv:
                    pids.append(int(proc.name))
    return pids


def clean_stale_runs() -> None:
    """What an earlier run killed outright left: its containers (still running: nspawn is in a
    session of its own), their bpffs mounts, cgroups and run directories. A run directory is
    named after the pytest process that made it; a live one belongs to a concurrent run."""
    runs = CACHE / "run"
    for run_dir in runs.iterdir() if runs.is_dir() else []:
        if run_dir.name.isdigit() and Path(f"/proc/{run_dir.name}").exists():
            continue
        for container in run_dir.iterdir() if run_dir.is_dir() else []:
            for pid in nspawn_pids(container.name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)  # halts the container
            with contextlib.suppress(Exception):
                wait_for(lambda c=container: not nspawn_pids(c.name), 20, "a stale container")
            for pid in nspawn_pids(container.name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            cleanup_leftovers(container.name, container / "bpffs")
        shutil.rmtree(run_dir, ignore_errors=True)
    for hierarchy in ("systemd", "unified"):
        base = Path("/sys/fs/cgroup") / hierarchy
        for top in base.glob(f"{PREFIX}*") if base.is_dir() else []:
            if not nspawn_pids(top.name):
                cleanup_leftovers(top.name)


# -- the packages and the rootfs --------------------------------------------------------------

def deb_dir(release: str) -> Path:
    return BUILD / "deb" / release


def build_debs(release: str) -> list[Path]:
    """The release's packages (make deb builds only that one here; skipped when up to date)."""
    done = subprocess.run(["make", "-s", "deb", f"DEBIAN_RELEASES={release}"], cwd=REPO,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, f"make deb failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    debs = sorted(deb_dir(release).glob("*.deb"))
    assert {d.name.split("_")[0] for d in debs} == {
        "brski-common", "joinproxyd", "brski-registrar", "pledge-sim"}, debs
    return debs


def rootfs_for(release: str, debs: list[Path]) -> Path:
    done = subprocess.run([str(REPO / "tools/nspawn-rootfs.sh"), release, str(CACHE),
                           *map(str, debs)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"nspawn-rootfs.sh failed:\n{done.stderr[-3000:]}"
    return Path(done.stdout.strip().splitlines()[-1])


def deb(debs: list[Path], package: str) -> str:
    return "/mnt/deb/" + next(d.name for d in debs if d.name.startswith(package + "_"))


# -- checks from the host, in the lab's namespaces ----------------------------------------------

def listening(host, ports: set[int]) -> list[str]:  # type: ignore[no-untyped-def]
    """Sockets of the namespace bound to one of these ports (TCP listen or UDP)."""
    out = host.run(["ss", "-Hlntu"]).stdout
    return [line for line in out.splitlines()
            if any(re.search(rf"[:\]]{port}\s", line + " ") for port in ports)]


def bpf_attachments(host) -> list[str]:  # type: ignore[no-untyped-def]
    """XDP and tc BPF programs attached to any interface of the namespace."""
    found = []
    for link in json.loads(host.run(["ip", "-j", "-d", "link", "show"]).stdout):
        name = link["ifname"]
        if "xdp" in link:
            prog = link["xdp"].get("prog", {})
            found.append(f"{name}: xdp {prog.get('name', '?')} (id {prog.get('id', '?')})")
        for direction in ("ingress", "egress"):
            out = host.run(["tc", "filter", "show", "dev", name, direction], check=False).stdout
            if out.strip():
                found.append(f"{name} {direction}: {out.strip()}")
    return found


def attached_ids(host) -> set[int]:  # type: ignore[no-untyped-def]
    """IDs of the XDP programs attached to the namespace's interfaces."""
    return {link["xdp"]["prog"]["id"]
            for link in json.loads(host.run(["ip", "-j", "-d", "link", "show"]).stdout)
            if "prog" in link.get("xdp", {})}


def loaded_program_ids() -> set[int]:
    done = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                          check=False)
    return {prog["id"] for prog in json.loads(done.stdout or "[]")}


def bpf_programs_of(pids: list[int]) -> set[int]:
    """IDs of loaded BPF programs that these (host) PIDs hold."""
    done = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0 or not done.stdout.strip():
        return set()
    return {prog["id"] for prog in json.loads(done.stdout)
            if any(p.get("pid") in pids for p in prog.get("pids", []))}


def security_scores(container: Container, units: list[str], release: str
                    ) -> dict[str, tuple[float, str]]:
    out = container.sh("systemd-analyze security --no-pager " + " ".join(units),
                       check=False).stdout
    (CACHE / f"security-{units[0].split('.')[0]}-{release}.txt").write_text(out)
    return {m.group(1): (float(m.group(2)), m.group(3)) for m in re.finditer(
        r"Overall exposure level for (\S+): ([\d.]+) (\w+)", out)}


# Holds the join port on every address of the namespace (the daemon's bind to the join
# link's link-local address then fails with EADDRINUSE) until it is stopped.
HOLD_PORT = """
import signal, socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.bind(("::", int(sys.argv[1])))
s.listen()
print("holding", flush=True)
signal.sigwait({signal.SIGTERM, signal.SIGINT})
"""


def lab_config() -> str:
    return toml({
        "daemon": {"log_level": "info", "drain_seconds": 1},
        "metrics": {"listen": "[::1]:9465"},
        "backbone": {"interface": "bb0"},
        # nat66 for the ULA pledges (an nftables table to find and to see removed), the
        # circuit proxy for link-local ones (pledge-sim below).
        "join": [{"interfaces": ["join*"], "modes": ["nat66", "circuit"], "port": PORT}],
        "registrars": {"discovery": ["static"],
                       "static": [{"address": REGISTRAR, "port": PORT, "preference": 10}],
                       "health_interval": 0.5, "health_timeout": 0.5},
        "announce": {"interval": 5},
        # The XDP join-port guard (on in the shipped file): BPF programs loaded, pinned and
        # attached by the daemon under its unit, to be found gone after stop. A rate no
        # enrollment reaches.
        "guard": {"enabled": True, "rate": 2000, "burst": 4000},
    })


# -- the test ---------------------------------------------------------------------------------

@contextlib.contextmanager
def containers(rootfs: Path, lab: Lab, run_dir: Path, binds: dict[Path, str]
               ) -> Iterator[tuple[Container, Container]]:
    proxy = Container(f"{PREFIX}{lab.run_id}-proxy", rootfs, lab.proxy.ns,
                      run_dir / f"{PREFIX}{lab.run_id}-proxy", binds)
    registrar = Container(f"{PREFIX}{lab.run_id}-reg", rootfs, lab.registrars[0].ns,
                          run_dir / f"{PREFIX}{lab.run_id}-reg", binds)
    try:
        proxy.boot()
        registrar.boot()
        proxy.wait_running()
        registrar.wait_running()
        yield proxy, registrar
    except BaseException:
        for c in (proxy, registrar):
            print(f"--- {c.name} console:\n{c.console()}")
        raise
    finally:
        proxy.stop()
        registrar.stop()


@pytest.mark.parametrize("release", RELEASES)
def test_packages_under_systemd_in_a_lab(tmp_path, release):
    times: dict[str, float] = {}
    started = mark = time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        times[name] = now - mark
        mark = now

    clean_stale_runs()
    debs = build_debs(release)
    lap("make deb")
    rootfs = rootfs_for(release, debs)
    lap("rootfs")

    run_dir = CACHE / "run" / str(os.getpid())
    pki_out = tmp_path / "pki"
    binds = {deb_dir(release): "/mnt/deb", tmp_path / "shared": "/mnt/shared"}
    (tmp_path / "shared").mkdir()
    scores: dict[str, tuple[float, str]] = {}
    memory: dict[str, int] = {}
    bpf_running = "not reached"
    try:
        with Lab(Topology(pledges=1, registrars=1, join_ula=True),
                 log_dir=tmp_path / "logs") as lab, \
                containers(rootfs, lab, run_dir, binds) as (proxy, registrar):
            lap("lab and boot")
            codename = proxy.sh(". /etc/os-release && echo $VERSION_CODENAME").stdout.strip()
            assert codename == release, (codename, release)

            # -- install with apt: Debian's dependencies come from the rootfs's apt cache --
            # (The container has no route to a mirror. Not --no-download: apt 2.6 then fails
            # on local .debs with "Pathname to install is not absolute".)
            reg_install = subprocess.Popen(  # both containers at once: py3compile is slow
                ["nsenter", "-t", str(registrar.leader), "-a", "--", "apt-get", "install",
                 "-y", "-q", deb(debs, "brski-common"), deb(debs, "brski-registrar")],
                env=CLEAN_ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            proxy.sh(f"apt-get install -y -q {deb(debs, 'brski-common')} "
                     f"{deb(debs, 'joinproxyd')} {deb(debs, 'pledge-sim')}", timeout=300)
            reg_out, _ = reg_install.communicate(timeout=300)
            assert reg_install.returncode == 0, reg_out[-3000:]
            suffix = {"bookworm": "~deb12u1", "trixie": "~deb13u1"}[release]
            assert proxy.sh("dpkg-query -W -f '${Version}' joinproxyd").stdout == \
                f"0.1.0{suffix}"
            lap("apt-get install")

            # -- brski-registrar: user, keys, both units started by the postinst -------------
            owner = registrar.sh("stat -c '%a %U' /var/lib/brski-registrar/pki/domain/ca.key "
                                 "/var/lib/brski-masa/signer.key").stdout.split("\n")
            assert owner[:2] == ["600 brski-registrar", "600 brski-masa"], owner
            wait_for(lambda: registrar.sh("systemctl is-active brski-masa brski-registrar",
                                          check=False).returncode == 0, 20,
                     "brski-masa and brski-registrar active")
            wait_for(lambda: listening(lab.registrars[0], {PORT}), 20,
                     "the registrar listening on 8443")
            assert "ready: listening on" in registrar.journal("brski-registrar")

            # -- joinproxyd: not started by the package; configured, then started ------------
            assert proxy.sh("systemctl is-enabled joinproxyd").stdout.strip() == "enabled"
            assert proxy.sh("systemctl is-active joinproxyd", check=False).stdout.strip() \
                == "inactive"
            pinned_before = sorted(p.name for p in proxy.path("/sys/fs/bpf").iterdir())
            forwarding_before = lab.proxy.run(
                ["cat", "/proc/sys/net/ipv6/conf/all/forwarding"]).stdout.strip()
            proxy.path("/etc/joinproxyd/joinproxyd.toml").write_text(lab_config())
            proxy.sh("joinproxyd --check-config /etc/joinproxyd/joinproxyd.toml")
            proxy.sh("systemctl start joinproxyd", timeout=60)
            assert proxy.sh("systemctl is-active joinproxyd").stdout.strip() == "active"
            assert "joinproxyd 0.1.0 started" in proxy.journal("joinproxyd")
            metrics = lab.proxy.run(["curl", "-sf", "http://[::1]:9465/metrics"]).stdout
            assert "joinproxyd_build_info" in metrics
            wait_for(lambda: re.search(r"^joinproxyd_registrar_up\{.*\} 1\.0$", lab.proxy.run(
                ["curl", "-sf", "http://[::1]:9465/metrics"]).stdout, re.M), 20, "registrar up")
            lab.proxy.run(["nft", "list", "table", "ip6", "joinproxyd"])  # nat66 is on
            daemon_pids = proxy.unit_host_pids("joinproxyd.service")
            assert daemon_pids, "no process in joinproxyd.service's cgroup"
            held_programs = bpf_programs_of(daemon_pids) | attached_ids(lab.proxy)
            attached_running = bpf_attachments(lab.proxy)
            assert any(a.startswith("join0: xdp jp_guard") for a in attached_running), \
                (attached_running, proxy.journal("joinproxyd")[-3000:])
            bpf_running = f"attached: {'; '.join(attached_running) or 'none'}"
            lap("joinproxyd started")

            # -- a pledge enrolls through the installed daemon to the installed registrar ----
            registrar.sh("runuser -u brski-registrar -- brski-pki idevid "
                         "/var/lib/brski-registrar/pki --serial sys-0 && "
                         "runuser -u brski-registrar -- brski-pki idevid "
                         "/var/lib/brski-registrar/pki --serial sys-1")
            shutil.copytree(registrar.path("/var/lib/brski-registrar/pki"), pki_out)
            shutil.copytree(pki_out, tmp_path / "shared/pki")
            done = lab.pledges[0].run(
                [PY, "-m", "pledge_sim.cli", "enroll", "--json", "--pki", str(pki_out),
                 "--serial", "sys-0", "--out", str(tmp_path / "ldevid"), "--max-backoff", "2",
                 "--registrar", f"[fe80::1%eth0]:{PORT}"], check=False, timeout=120)
            assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-3000:]}"
            result = json.loads(done.stdout)["results"][0]
            assert result["ok"], result
            verify = subprocess.run(["openssl", "verify", "-CAfile", str(pki_out / "domain/ca.crt"),
                                     result["ldevid_path"]], capture_output=True, text=True)
            assert verify.returncode == 0, verify.stdout + verify.stderr
            # The packaged pledge-sim, on the backbone next to the registrar.
            packaged = proxy.sh("cp -r /mnt/shared/pki /tmp/pki && pledge-sim enroll --json "
                                "--pki /tmp/pki --serial sys-1 --out /tmp/ldevid "
                                f"--max-backoff 2 --registrar '[{REGISTRAR}]:{PORT}'",
                                check=False, timeout=120)
            assert packaged.returncode == 0, packaged.stdout + packaged.stderr[-3000:]
            assert json.loads(packaged.stdout)["results"][0]["ok"]
            lap("enrollments")

            # -- structured journal fields for relay events ---------------------------------
            records = [json.loads(line) for line in
                       proxy.journal("joinproxyd", output="json").splitlines() if line]
            relays = [r for r in records if "closed after" in str(r.get("MESSAGE", ""))
                      and {"INTERFACE", "MODE", "REGISTRAR", "PLEDGE"} <= r.keys()]
            assert relays, [r.get("MESSAGE") for r in records][-20:]
            assert relays[0]["INTERFACE"] == "join0" and relays[0]["MODE"] == "circuit"
            assert REGISTRAR in relays[0]["REGISTRAR"]

            # -- reload: SIGHUP, same process -----------------------------------------------
            main_pid = proxy.show("joinproxyd", "MainPID")
            proxy.sh("systemctl reload joinproxyd", timeout=60)
            wait_for(lambda: 'joinproxyd_config_reloads_total{result="ok"} 1.0' in lab.proxy.run(
                ["curl", "-sf", "http://[::1]:9465/metrics"]).stdout, 15, "a reload counted")
            assert proxy.show("joinproxyd", "MainPID") == main_pid
            assert "configuration reloaded from" in proxy.journal("joinproxyd")

            # -- hardening, as systemd sees it ------------------------------------------------
            scores = security_scores(proxy, ["joinproxyd.service"], release)
            scores.update(security_scores(registrar, ["brski-registrar.service",
                                                      "brski-masa.service"], release))
            assert set(scores) == {"joinproxyd.service", "brski-registrar.service",
                                   "brski-masa.service"}, scores
            assert scores["joinproxyd.service"][0] <= 3.0, scores
            assert scores["brski-registrar.service"][0] <= 2.0, scores
            assert scores["brski-masa.service"][0] <= 2.0, scores
            caps = proxy.sh(f"grep ^Cap /proc/{main_pid}/status").stdout
            assert re.search(r"CapEff:\s*000000c000003000", caps), caps  # the four, no more
            # Resident memory after an enrollment, against the units' MemoryHigh ceilings
            # (the main process's VmRSS: the container has no memory controller of its own).
            for container, unit in ((proxy, "joinproxyd"), (registrar, "brski-registrar"),
                                    (registrar, "brski-masa")):
                pid, high = (container.show(unit, key) for key in ("MainPID", "MemoryHigh"))
                rss = container.sh(f"grep ^VmRSS: /proc/{pid}/status").stdout.split()[1]
                memory[unit] = int(rss) * 1024
                assert memory[unit] < int(high), (unit, memory[unit], high)
            lap("reload and security")

            # -- watchdog: a stopped daemon is killed and restarted by systemd ---------------
            # Shorter than the shipped WatchdogSec=30 (same mechanism), to fit the time budget.
            dropin = proxy.path("/run/systemd/system/joinproxyd.service.d/watchdog-test.conf")
            dropin.parent.mkdir(parents=True, exist_ok=True)
            dropin.write_text("[Service]\nWatchdogSec=3\nTimeoutAbortSec=2\n")
            proxy.sh("systemctl daemon-reload && systemctl restart joinproxyd", timeout=60)
            stalled = proxy.show("joinproxyd", "MainPID")
            restarts = int(proxy.show("joinproxyd", "NRestarts"))
            proxy.sh("systemctl kill --kill-whom=main --signal=SIGSTOP joinproxyd")
            wait_for(lambda: int(proxy.show("joinproxyd", "NRestarts")) > restarts
                     and proxy.show("joinproxyd", "ActiveState") == "active"
                     and proxy.show("joinproxyd", "MainPID") not in ("0", stalled), 30,
                     "systemd restarting the stalled daemon")
            journal = proxy.journal("joinproxyd", output="short")
            assert "Watchdog timeout" in journal, journal[-2000:]
            # The killed daemon's pinned guard kept working; its successor holds the hook.
            wait_for(lambda: any(a.startswith("join0: xdp jp_guard")
                                 for a in bpf_attachments(lab.proxy)), 10,
                     "the guard attached after the restart")
            lap("watchdog")

            # -- stop: nothing left behind ---------------------------------------------------
            daemon_pids = proxy.unit_host_pids("joinproxyd.service")
            held_programs |= bpf_programs_of(daemon_pids) | attached_ids(lab.proxy)
            proxy.sh("systemctl stop joinproxyd", timeout=60)
            assert proxy.sh("systemctl is-active joinproxyd",
                            check=False).stdout.strip() == "inactive"
            assert lab.proxy.run(["nft", "list", "table", "ip6", "joinproxyd"],
                                 check=False).returncode != 0, "nft table left behind"
            assert listening(lab.proxy, {PORT, 9465, 7017}) == []
            assert bpf_attachments(lab.proxy) == []
            # Unpinned, detached and closed programs are freed by the kernel shortly after.
            wait_for(lambda: not held_programs & loaded_program_ids(), 10,
                     f"the daemon's BPF programs {sorted(held_programs)} to be freed")
            # A fresh bpffs holds the kernel's maps.debug and progs.debug; nothing else may stay.
            assert sorted(p.name for p in proxy.path("/sys/fs/bpf").iterdir()) == pinned_before
            assert lab.proxy.run(["cat", "/proc/sys/net/ipv6/conf/all/forwarding"]
                                 ).stdout.strip() == forwarding_before
            registrar.sh("systemctl stop brski-registrar brski-masa", timeout=60)
            assert registrar.sh("systemctl is-active brski-registrar brski-masa",
                                check=False).stdout.split() == ["inactive", "inactive"]
            assert listening(lab.registrars[0], {PORT, 9443}) == []
            lap("stop")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        times["total"] = time.monotonic() - started
        report = [f"system test ({release}): "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in times.items())]
        report.append(f"BPF programs of the running daemon: {bpf_running}")
        report += [f"systemd-analyze security {unit}: {score} {level}"
                   for unit, (score, level) in sorted(scores.items())]
        report += [f"memory {unit}: {used / 2**20:.1f} MiB" for unit, used in memory.items()]
        CACHE.mkdir(parents=True, exist_ok=True)
        (CACHE / f"report-{release}.txt").write_text("\n".join(report) + "\n")
        print("\n".join(report))
    # The test's own budget: building the packages and the rootfs (minutes, once per machine
    # and release: build roots, debootstrap) are cached work, not the test's.
    assert times["total"] - times.get("make deb", 0) - times.get("rootfs", 0) < 300, times


# -- issue 11: configuration faults, and the registrar's units (defects 3 and 4) ---------------

@contextlib.contextmanager
def one_container(rootfs: Path, netns: str, name: str, run_dir: Path,
                  binds: dict[Path, str]) -> Iterator[Container]:
    box = Container(name, rootfs, netns, run_dir / name, binds)
    try:
        box.boot()
        box.wait_running()
        yield box
    except BaseException:
        print(f"--- {box.name} console:\n{box.console()}")
        raise
    finally:
        box.stop()


def failed_without_restarts(box: Container, unit: str, seconds: float = 6.0) -> None:
    """The unit failed with 78 (EX_CONFIG) and stays failed: no restart in more than twice
    RestartSec."""
    time.sleep(seconds)
    props = {p: box.show(unit, p) for p in ("ActiveState", "Result", "NRestarts",
                                            "ExecMainStatus")}
    assert props == {"ActiveState": "failed", "Result": "exit-code", "NRestarts": "0",
                     "ExecMainStatus": "78"}, (props, box.journal(unit)[-2000:])


@pytest.mark.parametrize("release", RELEASES)
def test_joinproxyd_configuration_faults_under_systemd(tmp_path, release):
    """Defect 3: a broken file fails the unit once (no restart loop) with the reason in
    `systemctl status`; `systemctl reload` of a broken file fails and the running daemon
    keeps its configuration."""
    clean_stale_runs()
    debs = build_debs(release)
    rootfs = rootfs_for(release, debs)
    run_dir = CACHE / "run" / str(os.getpid())
    metrics = ["curl", "-sf", "http://[::1]:9465/metrics"]
    try:
        with Lab(Topology(pledges=1, registrars=1), log_dir=tmp_path / "logs") as lab, \
                one_container(rootfs, lab.proxy.ns, f"{PREFIX}{lab.run_id}-cfg", run_dir,
                              {deb_dir(release): "/mnt/deb"}) as proxy:
            proxy.sh(f"apt-get install -y -q {deb(debs, 'brski-common')} "
                     f"{deb(debs, 'joinproxyd')}", timeout=300)
            config = proxy.path("/etc/joinproxyd/joinproxyd.toml")
            # (No [[join]] table is valid: the shipped file, which serves nothing.)
            config.write_text('[backbone]\ninterface = "bb0"\n[[join]]\n'
                              'interfaces = ["join*"]\nmodes = ["teleport"]\n')
            started = proxy.sh("systemctl start joinproxyd", check=False, timeout=60)
            assert started.returncode != 0
            failed_without_restarts(proxy, "joinproxyd")
            reason = "join[0].modes: 'teleport' is not one of circuit, nat66, ipip, coaps"
            status = proxy.sh("systemctl status --no-pager -n 20 joinproxyd",
                              check=False).stdout
            assert reason in status and "status=78/CONFIG" in status, status
            assert reason in proxy.show("joinproxyd", "StatusText")

            # A good file: running. Then a broken one: the reload fails, nothing changes.
            config.write_text(lab_config())
            proxy.sh("systemctl reset-failed joinproxyd && systemctl start joinproxyd",
                     timeout=60)
            main_pid = proxy.show("joinproxyd", "MainPID")
            wait_for(lambda: "joinproxyd_config_reloads_total" in lab.proxy.run(
                metrics, check=False).stdout, 20, "joinproxyd metrics")
            assert "[limits]" not in lab_config()
            config.write_text(lab_config() + "\n[limits]\nidle_timeout = 0\n")
            reload = proxy.sh("systemctl reload joinproxyd", check=False, timeout=60)
            assert reload.returncode != 0, reload.stdout + reload.stderr
            time.sleep(1)
            assert proxy.show("joinproxyd", "ActiveState") == "active"
            assert proxy.show("joinproxyd", "MainPID") == main_pid
            assert "limits.idle_timeout: must be a number" in proxy.journal("joinproxyd")
            text = lab.proxy.run(metrics).stdout
            # No SIGHUP reached the daemon: no reload counted, neither ok nor refused.
            assert not re.search(r"^joinproxyd_config_reloads_total\{.*\} [1-9]", text, re.M), \
                [x for x in text.splitlines() if "reloads" in x]
            assert "configuration reloaded from" not in proxy.journal("joinproxyd")
            # Fixed again: the reload goes through to the same process.
            config.write_text(lab_config())
            proxy.sh("systemctl reload joinproxyd", timeout=60)
            wait_for(lambda: 'joinproxyd_config_reloads_total{result="ok"} 1.0' in
                     lab.proxy.run(metrics).stdout, 15, "the good reload counted")
            assert proxy.show("joinproxyd", "MainPID") == main_pid
            assert proxy.show("joinproxyd", "NRestarts") == "0"

            # The join port held by another process: no READY=1 (the unit stays
            # "activating"), STATUS= names the link that is not served and why, nothing is
            # announced; once the port is free the bind is retried and the unit is active.
            proxy.sh("systemctl stop joinproxyd", timeout=60)
            holder = lab.proxy.spawn([PY, "-c", HOLD_PORT, str(PORT)], name="port-holder")
            try:
                wait_for(lambda: "holding" in holder.log(), 10, "the port holder")
                proxy.sh("systemctl start --no-block joinproxyd", timeout=60)
                wait_for(lambda: "NOT SERVING" in proxy.show("joinproxyd", "StatusText"), 20,
                         "STATUS= naming the link that is not served")
                status = proxy.show("joinproxyd", "StatusText")
                assert "join0" in status and "in use" in status.lower(), status
                time.sleep(2)
                assert proxy.show("joinproxyd", "ActiveState") == "activating"
                errors = lab.proxy.run(metrics).stdout
                assert re.search(r'^joinproxyd_listener_errors_total\{.*interface="join0".*\} '
                                 r"[1-9]", errors, re.M), errors[-2000:]
            finally:
                holder.stop()
            wait_for(lambda: proxy.show("joinproxyd", "ActiveState") == "active", 40,
                     "READY=1 once the join port is free")
            assert "NOT SERVING" not in proxy.show("joinproxyd", "StatusText")
            assert any("join0" in line or "%" in line for line in listening(lab.proxy, {PORT}))
            proxy.sh("systemctl stop joinproxyd", timeout=60)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.parametrize("release", RELEASES)
def test_registrar_units_notify_users_metrics_and_refusals(tmp_path, release):
    """Defect 4 (and 3 for the registrar): both units Type=notify and active, each service as
    its own user; the registrar's /metrics reachable; a pledge with an IDevID from an unknown
    manufacturer gets the unknown-ca alert and the installed registrar logs and counts it;
    a broken registrar.toml fails the unit once."""
    clean_stale_runs()
    debs = build_debs(release)
    rootfs = rootfs_for(release, debs)
    run_dir = CACHE / "run" / str(os.getpid())
    foreign = tmp_path / "foreign"
    subprocess.run([PY, "-m", "brski.cli.pki", "init", str(foreign), "--serial", "SN-F"],
                   check=True, capture_output=True, timeout=60)
    idevid = foreign / "manufacturer/idevid/SN-F"
    try:
        with Lab(Topology(pledges=1, registrars=1), log_dir=tmp_path / "logs") as lab, \
                one_container(rootfs, lab.registrars[0].ns, f"{PREFIX}{lab.run_id}-reg2",
                              run_dir, {deb_dir(release): "/mnt/deb"}) as box:
            host = lab.registrars[0]
            box.sh(f"apt-get install -y -q {deb(debs, 'brski-common')} "
                   f"{deb(debs, 'brski-registrar')}", timeout=300)
            units = ("brski-masa", "brski-registrar")
            wait_for(lambda: box.sh("systemctl is-active " + " ".join(units),
                                    check=False).returncode == 0, 30, "both units active")
            for unit in units:
                assert box.show(unit, "Type") == "notify"
                assert box.show(unit, "NRestarts") == "0"
                assert box.show(unit, "StatusText").startswith("listening on "), unit
                pid = box.show(unit, "MainPID")
                assert box.sh(f"ps -o user= -p {pid}").stdout.strip() == unit
            # The registrar cannot read the MASA's keys: it does not even have them.
            assert box.sh("runuser -u brski-registrar -- cat /var/lib/brski-masa/signer.key",
                          check=False).returncode != 0
            assert not box.path("/var/lib/brski-registrar/pki/masa/signer.key").exists()

            def metrics(port: int) -> str:
                return host.run(["curl", "-sf", f"http://[::1]:{port}/metrics"]).stdout

            assert "brski_masa_refusals_total" in metrics(9467)
            line = 'brski_registrar_refusals_total{endpoint="tls",reason="tls-unknown-ca"}'
            assert f"{line} 0.0" in metrics(9466)

            done = host.run(["curl", "-sS", "-k", "--cert", f"{idevid}.crt", "--key",
                             f"{idevid}.key", f"https://[::1]:{PORT}/.well-known/est/cacerts"],
                            check=False)
            assert done.returncode != 0 and "alert unknown ca" in done.stderr, done.stderr
            assert f"{line} 1.0" in metrics(9466)
            journal = box.journal("brski-registrar")
            refused = [x for x in journal.splitlines() if "TLS handshake" in x]
            assert len(refused) == 1 and "tls-unknown-ca" in refused[0], journal[-2000:]
            assert "serialNumber=SN-F" in refused[0], refused

            # A broken file: one failure with the reason, no restart loop.
            toml = box.path("/etc/brski-registrar/registrar.toml")
            toml.write_text(toml.read_text().replace("grasp = true", 'grasp = "yes"'))
            restarted = box.sh("systemctl restart brski-registrar", check=False, timeout=60)
            assert restarted.returncode != 0
            failed_without_restarts(box, "brski-registrar")
            assert "announce.grasp: must be true or false" in box.show("brski-registrar",
                                                                       "StatusText")
            assert box.show("brski-masa", "ActiveState") == "active"
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# -- issue 12: packages per role, from the README's own lines; a fresh router serves nothing ----

ROLES = {"router": {"brski-common", "joinproxyd"},
         "registrar host": {"brski-common", "brski-registrar"},
         "lab or test host": {"brski-common", "pledge-sim"}}
OURS = {"brski-common", "joinproxyd", "brski-registrar", "pledge-sim"}
NO_JOIN = "no join link configured"


def readme_install_line(role: str) -> str:
    """The README's install command for a role: the line after its `# <role>` comment."""
    found = re.search(rf"^ {{4}}# {re.escape(role)}\b[^\n]*\n {{4}}(apt install [^\n]+)$",
                      (REPO / "README.md").read_text(), re.M)
    assert found, f"README.md has no install line for the {role}"
    return found.group(1)


def readme_release_line() -> str:
    """The README's line before the install lines that names the release's directory
    (build/deb/$VERSION_CODENAME/)."""
    found = re.search(r"^ {4}(\. /etc/os-release)\b[^\n]*$", (REPO / "README.md").read_text(),
                      re.M)
    assert found, "README.md does not set VERSION_CODENAME before its install lines"
    return found.group(1)


def install_from_readme(box: Container, role: str) -> subprocess.Popen[str]:
    """Run the README's lines for `role` in the container, from a checkout-like directory
    (/mnt/src, whose build/deb/ is ours); apt answers yes as an operator would."""
    line = f"{readme_release_line()} && {readme_install_line(role)}"
    box.path("/etc/apt/apt.conf.d/90test-assume-yes").write_text('APT::Get::Assume-Yes "true";\n')
    return subprocess.Popen(["nsenter", "-t", str(box.leader), "-a", "--", "/bin/sh", "-c",
                             f"cd /mnt/src && {line}"], env=CLEAN_ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def installed_of_ours(box: Container) -> set[str]:
    out = box.sh("dpkg-query -W -f '${Package} ${db:Status-Abbrev}\\n'").stdout
    return {line.split()[0] for line in out.splitlines()
            if line.split()[0] in OURS and line.split()[1].startswith("ii")}


def test_readme_install_lines_name_each_role_and_the_built_packages():
    debs = {d.name.split("_")[0] for d in (BUILD / "deb").glob("*/*.deb")} or OURS
    readme_release_line()
    for role, packages in ROLES.items():
        line = readme_install_line(role)
        named = set(re.findall(r"\./build/deb/\$VERSION_CODENAME/([a-z-]+)_\*\.deb", line))
        assert named == packages and named <= debs, (role, line)
        assert len(re.findall(r"\./build/deb/", line)) == len(packages), line


@pytest.mark.parametrize("release", RELEASES)
def test_router_and_registrar_roles_installed_alone_from_the_readme(tmp_path, release):
    """Each role installed with its README line, alone in its container; the fresh router's
    joinproxyd, started as at boot, serves nothing and says why, until a join link is
    configured and reloaded."""
    from test_field_readiness import floods

    from lab.sniffers import GRASP_SNIFFER  # a pledge hearing AN_Proxy

    clean_stale_runs()
    debs = build_debs(release)
    rootfs = rootfs_for(release, debs)
    run_dir = CACHE / "run" / str(os.getpid())
    # All releases' directories, as in a checkout: the README's line picks the container's.
    binds = {BUILD / "deb": "/mnt/src/build/deb"}
    metrics = ["curl", "-sf", "http://[::1]:9465/metrics"]
    try:
        with Lab(Topology(pledges=1, registrars=1), log_dir=tmp_path / "logs") as lab, \
                containers(rootfs, lab, run_dir, binds) as (proxy, registrar):
            sniffer = lab.pledges[0].spawn([PY, "-c", GRASP_SNIFFER], name="grasp-sniffer")
            reg_install = install_from_readme(registrar, "registrar host")
            router_install = install_from_readme(proxy, "router")
            for done in (router_install, reg_install):
                out, _ = done.communicate(timeout=300)
                assert done.returncode == 0, out[-3000:]
            assert installed_of_ours(proxy) == ROLES["router"]
            assert proxy.sh("dpkg-query -W -f '${Version}' joinproxyd brski-common").stdout \
                == 2 * ("0.1.0" + {"bookworm": "~deb12u1", "trixie": "~deb13u1"}[release])
            assert installed_of_ours(registrar) == ROLES["registrar host"]
            assert proxy.sh("for c in joinproxyd joinproxyctl; do command -v $c; done"
                            ).stdout.split() == ["/usr/sbin/joinproxyd", "/usr/bin/joinproxyctl"]
            assert registrar.sh(
                "for c in brski-registrar brski-masa brski-pki; do command -v $c; done").stdout \
                .split() == ["/usr/sbin/brski-registrar", "/usr/sbin/brski-masa",
                             "/usr/bin/brski-pki"]

            # -- the registrar host: both services up, from the package alone --------------
            wait_for(lambda: registrar.sh("systemctl is-active brski-masa brski-registrar",
                                          check=False).returncode == 0, 30,
                     "brski-masa and brski-registrar active")
            wait_for(lambda: listening(lab.registrars[0], {PORT}), 20, "the registrar on 8443")

            # -- the router: enabled, not started; started as the next boot would ----------
            # (a reboot would drop the container's volatile overlay, and the package with it)
            assert proxy.sh("systemctl is-enabled joinproxyd").stdout.strip() == "enabled"
            assert proxy.sh("systemctl is-active joinproxyd",
                            check=False).stdout.strip() == "inactive"
            pinned_before = sorted(p.name for p in proxy.path("/sys/fs/bpf").iterdir())
            proxy.sh("systemctl start joinproxyd", timeout=60)  # returns after READY=1
            assert proxy.show("joinproxyd", "ActiveState") == "active"
            status_text = proxy.show("joinproxyd", "StatusText")
            assert status_text.startswith(f"serving nothing ({NO_JOIN}"), status_text
            assert f"Status: \"serving nothing ({NO_JOIN}" in proxy.sh(
                "systemctl status --no-pager joinproxyd").stdout
            ctl = proxy.sh("joinproxyctl status").stdout
            assert f"joining CLOSED ({NO_JOIN}" in ctl, ctl
            assert f"started: serving nothing ({NO_JOIN}" in proxy.journal("joinproxyd")
            wait_for(lambda: "joinproxyd_build_info" in lab.proxy.run(metrics).stdout, 20,
                     "joinproxyd metrics")
            time.sleep(2)  # what would be served, would be by now
            assert listening(lab.proxy, {PORT}) == []
            assert bpf_attachments(lab.proxy) == []
            assert bpf_programs_of(proxy.unit_host_pids("joinproxyd.service")) == set()
            assert sorted(p.name for p in proxy.path("/sys/fs/bpf").iterdir()) == pinned_before
            text = lab.proxy.run(metrics).stdout
            assert not re.search(r"^joinproxyd_announcements_total\{.*\} [1-9]", text, re.M)
            assert "joinproxyd_join_interfaces 0.0" in text
            assert floods(sniffer) == [], "an AN_Proxy flood from an unconfigured router"

            # -- the control socket: the daemon's user's, in its 0700 directory ------------
            assert proxy.sh("stat -c '%a %U:%G' /run/joinproxyd /run/joinproxyd/control.sock"
                            ).stdout.split("\n")[:2] == ["700 joinproxyd:joinproxyd",
                                                         "600 joinproxyd:joinproxyd"]
            denied = proxy.sh("runuser -u nobody -- joinproxyctl status", check=False)
            assert denied.returncode == 1 and "ermission denied" in denied.stderr, denied

            # -- the examples installed with the package check out with the installed daemon
            examples = proxy.sh("ls /usr/share/doc/joinproxyd/examples/").stdout.split()
            assert {"circuit.toml", "nat66.toml", "ipip.toml"} <= set(examples), examples
            for name in examples:
                checked = proxy.sh("joinproxyd --check-config "
                                   f"/usr/share/doc/joinproxyd/examples/{name}", check=False)
                assert checked.stdout.strip() == "ok", (name, checked.stderr)

            # -- a join link configured and reloaded: served, guarded, announced ------------
            main_pid = proxy.show("joinproxyd", "MainPID")
            proxy.path("/etc/joinproxyd/joinproxyd.toml").write_text(lab_config())
            proxy.sh("systemctl reload joinproxyd", timeout=60)
            wait_for(lambda: listening(lab.proxy, {PORT}), 20, "the join port listening")
            wait_for(lambda: any(a.startswith("join0: xdp jp_guard")
                                 for a in bpf_attachments(lab.proxy)), 20, "the guard on join0")
            wait_for(lambda: "joining open" in proxy.sh("joinproxyctl status").stdout, 20,
                     "joining open")
            assert proxy.show("joinproxyd", "StatusText").startswith("serving join0(")
            assert NO_JOIN not in proxy.show("joinproxyd", "StatusText")
            wait_for(lambda: floods(sniffer), 15, "an AN_Proxy flood on join0")
            assert proxy.show("joinproxyd", "MainPID") == main_pid
            proxy.sh("systemctl stop joinproxyd", timeout=60)
            assert bpf_attachments(lab.proxy) == []
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# -- issue 17: the packages of one release are refused on the other ----------------------------

@pytest.mark.parametrize(("built_for", "installed_on"), [("bookworm", "trixie"),
                                                         ("trixie", "bookworm")])
def test_packages_of_one_release_are_refused_on_the_other(built_for, installed_on):
    """The router packages of one release on the other: apt refuses them with the unmet
    interpreter dependency (their vendored extension modules are built for one CPython) and
    installs nothing of ours; no half-configured package is left."""
    clean_stale_runs()
    foreign = [d for d in build_debs(built_for)
               if d.name.split("_")[0] in ("brski-common", "joinproxyd")]
    rootfs = rootfs_for(installed_on, build_debs(installed_on))
    common = next(d for d in foreign if d.name.startswith("brski-common_"))
    depends = subprocess.run(["dpkg-deb", "-f", str(common), "Depends"], capture_output=True,
                             text=True, check=True).stdout
    # What makes the package release-specific: the interpreter its compiled modules are for.
    interpreter = re.findall(r"\bpython3\.\d+\b", depends)
    assert len(interpreter) == 1, depends
    script = ("apt-get install -y -q " + " ".join(f"/mnt/deb/{d.name}" for d in foreign)
              + "; echo apt-exit=$?; dpkg-query -W -f '${Package} ${db:Status-Abbrev}\\n' "
              "brski-common joinproxyd 2>&1; true")
    done = subprocess.run([str(REPO / "tools/nspawn-run.sh"), str(rootfs),
                           f"{PREFIX}{os.getpid()}-refuse", "--volatile=overlay",
                           "--private-network", f"--bind-ro={deb_dir(built_for)}:/mnt/deb",
                           "--setenv=LANG=C.UTF-8", "--", "sh", "-c", script],
                          capture_output=True, text=True, timeout=120, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "apt-exit=100" in out, out[-3000:]
    assert "unmet dependencies" in out, out[-3000:]
    assert f"brski-common : Depends: {interpreter[0]} but it is not installable" in out, \
        out[-3000:]
    assert out.count("dpkg-query: no packages found matching") == 2, out[-3000:]
