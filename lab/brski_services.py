"""Real BRSKI in a lab: MASA + registrar on a registrar host, pledge-sim in pledge namespaces.

The services are the project's own (``registrar.masa_cli``, ``registrar.cli``) with the
configuration ``lab.registrar_setup.write_configs`` makes from a ``brski-pki init`` directory;
pledges are ``pledge_sim.cli enroll --json`` processes whose reports come back parsed. Used
by the tests that enroll through joinproxyd, and meant for the demo and test_enroll_e2e.py.

    from lab.brski_services import Services, enroll, enroll_each, ldevid_verifies, make_pki

    pki = make_pki(tmp / "pki", ["p-0", "p-1"])
    services = Services(lab.registrars[0], pki, tmp / "r0",
                        registrar_listen=["[fd4a:5044::100]:8443"], announce_interfaces=[])
    services.start()                                 # MASA, then registrar; both ready
    run = enroll(lab.pledges[0], pki, tmp / "out", "--serial", "p-0",
                 "--registrar", "[fe80::1%eth0]:8443")
    assert run.ok and ldevid_verifies(pki, run.results[0]["ldevid_path"])
    results = enroll_each(lab.pledges, pki, tmp / "out", ["p-0", "p-1"], "--discover", "grasp")
    services.stop("registrar", signal.SIGKILL)       # or services.stop() for both, SIGTERM
    with services.store("registrar") as store: ...   # registrar.store.Store, read-only use

API:

``make_pki(root, serials, *extra)``
    ``brski-pki init root --serial S ...`` (extra arguments passed on); returns ``root``.
``Services(host, pki, work, interface="eth0", **config)``
    Writes ``work/registrar.toml`` and ``work/masa.toml``. ``config`` goes to
    ``write_configs``; defaults here: the registrar listens on the link-local address of the
    host's ``interface`` (default eth0: ``[fe80::b:2%eth0]:8443``; with ``registrar_listen``
    given the host needs no such interface) and announces on it by GRASP (every second) and
    mDNS, the MASA listens on ``[::1]:9443`` (each host has its own loopback), Retry-After 1 s
    and a 2 s MASA timeout. ``start(*names)`` starts "masa" then "registrar" (default both)
    and waits for each to log ready (a restart waits for one more ready line);
    ``stop(*names, sig=SIGTERM)`` signals and reaps; ``process(name)``, ``log(name)``,
    ``logs()`` (all of them, for a failing test's output), ``store(role)``,
    ``issued()`` (serials with an LDevID in the registrar's store) and ``peers()`` (the
    client addresses in the registrar's access log, in order).
``pledge_sim_argv(pki, out, *args, verbose=True, max_backoff=2)``
    The ``pledge-sim enroll --json --pki ... --out ...`` command line; ``args`` are any
    further enroll options (``--serial``, ``--count``, ``--discover``, ``--registrar``...).
``enroll(host, pki, out, *args, timeout=120) -> PledgeRun``
    Runs pledge-sim in ``host`` and waits for it.
``spawn_enroll(host, pki, out, *args, name="pledge-sim") -> PledgeSim``
    The same in the background; ``PledgeSim.wait(timeout) -> PledgeRun``, ``.alive()``,
    ``.log()`` (stderr: progress lines with ``verbose``).
``enroll_each(hosts, pki, out, serials, *args, timeout=120) -> list[dict]``
    One pledge-sim per host, one serial each, all at once; the results merged. A pledge-sim
    that printed no report gives ``{"serial": S, "ok": False, "code": "crashed", ...}``.
``PledgeRun``
    ``rc``, ``doc`` (the JSON report, ``{}`` if none), ``stderr``, ``results`` (one dict per
    pledge, as ``EnrollResult.to_json``: serial, ok, proxy, method, ldevid_path, ...),
    ``by_serial()``, ``ok`` (exit 0 and every result ok).
``openssl_verify(ca, cert) -> str`` / ``ldevid_verifies(pki, cert) -> bool``
    ``openssl verify -CAfile`` output / whether a certificate verifies against the PKI's
    domain CA.

Every process is started with ``Host.spawn``, so the lab stops it on exit.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .netns import LabError
from .topology import Host, LabProcess

if TYPE_CHECKING:  # the lab itself does not depend on the registrar package
    from registrar.store import Store

PY = sys.executable
REGISTRAR_PORT = 8443
MASA_PORT = 9443
SERVICES = {"masa": "registrar.masa_cli", "registrar": "registrar.cli"}
# aiohttp's access log, as web.py configures it: '%a "%r" %s %b' after the logger's prefix.
_ACCESS = re.compile(r'(\S+) "(?:GET|POST|PUT|HEAD|DELETE|OPTIONS|PATCH) \S+ HTTP/[0-9.]+"')


def make_pki(root: Path, serials: Sequence[str], *extra: str) -> Path:
    """A test PKI with an IDevID for each serial (``brski-pki init``)."""
    argv = [PY, "-m", "brski.cli.pki", "init", str(root), *extra]
    for serial in serials:
        argv += ["--serial", serial]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise LabError(f"brski-pki init: {(done.stderr or done.stdout).strip()}")
    return root


class Services:
    """A MASA and a registrar on one lab host, configured from a brski-pki directory."""

    def __init__(self, host: Host, pki: Path, work: Path, interface: str = "eth0",
                 **config: Any) -> None:
        from lab.registrar_setup import write_configs

        self.host = host
        self.pki = pki
        self.work = work
        settings: dict[str, Any] = {
            "masa_listen": [f"[::1]:{MASA_PORT}"],
            "announce_interfaces": [interface],
            "grasp_period": 1.0,
            "retry_after": 1,
            "masa_timeout": 2.0,
        }
        settings.update(config)
        if "registrar_listen" not in settings:  # only then does the host need the interface
            settings["registrar_listen"] = [
                f"[{host.address(interface, link_local=True)}%{interface}]:{REGISTRAR_PORT}"]
        self.config = settings
        registrar_toml, masa_toml = write_configs(pki, work, **settings)
        self.tomls = {"registrar": registrar_toml, "masa": masa_toml}
        self.processes: dict[str, LabProcess] = {}
        self._history: list[LabProcess] = []  # every process started, for logs()

    def start(self, *names: str, timeout: float = 20) -> Services:
        """Start the named services (default: MASA, then registrar), each ready on return."""
        from lab.registrar_setup import wait_ready

        for name in names or ("masa", "registrar"):
            if name in self.processes and self.processes[name].alive():
                raise LabError(f"{self.host.name}: {name} is already running")
            proc = self.host.spawn([PY, "-m", SERVICES[name], "--config",
                                    str(self.tomls[name])], name=name)
            self.processes[name] = proc
            self._history.append(proc)
            try:
                wait_ready(proc.log, timeout, alive=proc.alive)
            except (TimeoutError, RuntimeError) as exc:
                raise LabError(f"{self.host.name}: {name} did not start: {exc}") from None
        return self

    def stop(self, *names: str, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        """Signal the named services (default: registrar, then MASA) and reap them."""
        for name in names or ("registrar", "masa"):
            proc = self.processes.get(name)
            if proc is None or not proc.alive():
                continue
            proc.signal(sig)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.signal(signal.SIGKILL)
                proc.popen.wait(5)

    def process(self, name: str) -> LabProcess:
        return self.processes[name]

    def log(self, name: str) -> str:
        """Everything the service logged, over all its runs."""
        return "".join(p.log() for p in self._history if p.name == name)

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(f"--- {self.host.name} {p.name} ({p.log_path.name}):\n{p.log()[-tail:]}"
                         for p in self._history)

    @contextmanager
    def store(self, role: str) -> Iterator[Store]:
        """The registrar's or the MASA's store (registrar.store.Store): its SQLite file, or
        the PostgreSQL database the configuration names."""
        from registrar.store import Store

        url = self.config.get("store_url" if role == "registrar" else "masa_store_url")
        with Store(url or self.work / f"{role}.db", role) as store:
            yield store

    def issued(self) -> set[str]:
        """Serials the registrar issued an LDevID to (from its store)."""
        with self.store("registrar") as store:
            return {c.serial for c in store.certificates()}

    def peers(self) -> list[str]:
        """Client addresses of the registrar's HTTP requests (its access log), in order."""
        return [m.group(1) for m in _ACCESS.finditer(self.log("registrar"))]


# -- pledges ------------------------------------------------------------------------------------

@dataclass
class PledgeRun:
    """One pledge-sim run: exit status, its JSON report, its stderr."""

    rc: int | None
    doc: dict[str, Any]
    stderr: str

    @property
    def results(self) -> list[dict[str, Any]]:
        results = self.doc.get("results", [])
        return results if isinstance(results, list) else []

    def by_serial(self) -> dict[str, dict[str, Any]]:
        return {r["serial"]: r for r in self.results}

    @property
    def ok(self) -> bool:
        return self.rc == 0 and bool(self.results) and all(r.get("ok") for r in self.results)


def parse_run(rc: int | None, stdout: str, stderr: str) -> PledgeRun:
    try:
        doc = json.loads(stdout) if stdout.strip() else {}
    except ValueError:
        doc = {"unparsed": stdout}
    return PledgeRun(rc, doc if isinstance(doc, dict) else {"unparsed": stdout}, stderr)


def pledge_sim_argv(pki: Path, out: Path, *args: str, verbose: bool = True,
                    max_backoff: float = 2) -> list[str]:
    return [PY, "-m", "pledge_sim.cli", *(["-v"] if verbose else []), "enroll", "--json",
            "--pki", str(pki), "--out", str(out), "--max-backoff", f"{max_backoff:g}", *args]


def enroll(host: Host, pki: Path, out: Path, *args: str, timeout: float = 120,
           verbose: bool = True) -> PledgeRun:
    """pledge-sim in ``host``, waited for."""
    done = host.run(pledge_sim_argv(pki, out, *args, verbose=verbose), check=False,
                    timeout=timeout)
    return parse_run(done.returncode, done.stdout, done.stderr)


@dataclass
class PledgeSim:
    """pledge-sim running in the background: report to a file, stderr to the process log."""

    process: LabProcess
    report: Path
    serials: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        return self.process.alive()

    def log(self) -> str:
        return self.process.log()

    def wait(self, timeout: float = 120) -> PledgeRun:
        try:
            self.process.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.stop()
            raise LabError(f"pledge-sim {' '.join(self.serials)} still running after "
                           f"{timeout} s:\n{self.log()[-3000:]}") from None
        try:
            stdout = self.report.read_text()
        except OSError:
            stdout = ""
        return parse_run(self.process.popen.returncode, stdout, self.log())


def spawn_enroll(host: Host, pki: Path, out: Path, *args: str, name: str = "pledge-sim",
                 verbose: bool = True) -> PledgeSim:
    """pledge-sim in ``host`` in the background; its report lands next to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    # Numbered like the process's log file: unique within the lab.
    report = out.parent / f"{out.name}-report-{host.name}-{len(host.lab.processes)}.json"
    argv = ["sh", "-c", 'exec "$@" > "$0"', str(report),
            *pledge_sim_argv(pki, out, *args, verbose=verbose)]
    serials = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--serial"]
    return PledgeSim(host.spawn(argv, name=name), report, serials)


def enroll_each(hosts: Sequence[Host], pki: Path, out: Path, serials: Sequence[str],
                *args: str, timeout: float = 120) -> list[dict[str, Any]]:
    """One pledge-sim per host with one serial each, all at once; their results merged."""
    if len(hosts) != len(serials):
        raise LabError(f"{len(hosts)} hosts for {len(serials)} serials")
    running = [spawn_enroll(host, pki, out, "--serial", serial, *args)
               for host, serial in zip(hosts, serials, strict=True)]
    results: list[dict[str, Any]] = []
    for sim, serial in zip(running, serials, strict=True):
        run = sim.wait(timeout)
        if run.results:
            results += run.results
        else:
            last = run.stderr.strip().splitlines()[-1:] or ["no output"]
            results.append({"serial": serial, "ok": False, "code": "crashed",
                            "reason": last[0], "rc": run.rc})
    return results


def openssl_verify(ca: Path, cert: str | Path) -> str:
    done = subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(cert)],
                          capture_output=True, text=True, timeout=30, check=False)
    return (done.stdout + done.stderr).strip()


def ldevid_verifies(pki: Path, cert: str | Path | None) -> bool:
    """Does this LDevID verify against the PKI's domain CA?"""
    return cert is not None and openssl_verify(pki / "domain/ca.crt", cert).endswith(": OK")
