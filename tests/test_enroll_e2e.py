"""End-to-end enrollment in network namespaces, over real TLS, against the real services.

Each test builds a lab (``pledges_on_backbone``: the pledges sit on the registrar's own link
with link-local addresses only), a test PKI (``brski-pki``), and runs brski-masa and
brski-registrar from the configuration ``lab.registrar_setup.write_configs`` makes. The pledges
are ``pledge-sim`` processes in a pledge namespace; their JSON report, the LDevIDs they wrote,
and the registrar's and MASA's stores are what the tests check.

Misbehaving parts are real too: a TLS man in the middle (tests/test_enroll_mitm.py) with the
registrar's own or another certificate, a MASA that is stopped, a registrar killed with
SIGKILL and started again on the same database.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from brski.cli.pki import write_issued
from brski.pki import issue_registrar
from lab import Host, Lab, LabProcess, Topology, wait_for
from lab.registrar_setup import wait_ready, write_configs
from registrar.store import Store

pytestmark = pytest.mark.netns
PY = sys.executable
MITM = Path(__file__).with_name("test_enroll_mitm.py")
REGISTRAR_PORT = 8443
MITM_PORT = 9443


@dataclass
class Run:
    rc: int
    doc: dict
    stderr: str

    @property
    def results(self) -> list[dict]:
        return self.doc.get("results", [])

    def by_serial(self) -> dict[str, dict]:
        return {r["serial"]: r for r in self.results}


def parse_run(rc: int, stdout: str, stderr: str) -> Run:
    try:
        doc = json.loads(stdout) if stdout.strip() else {}
    except ValueError:
        doc = {"unparsed": stdout}
    return Run(rc, doc, stderr)


@dataclass
class Env:
    lab: Lab
    pki: Path
    work: Path
    registrar_toml: Path
    masa_toml: Path
    processes: dict[str, LabProcess] = field(default_factory=dict)

    @property
    def registrar_host(self) -> Host:
        return self.lab.registrars[0]

    @property
    def pledge_host(self) -> Host:
        return self.lab.pledges[0]

    @property
    def registrar_ll(self) -> str:
        return self.registrar_host.address("eth0", link_local=True)

    def start(self, name: str) -> LabProcess:
        module, toml = {"masa": ("registrar.masa_cli", self.masa_toml),
                        "registrar": ("registrar.cli", self.registrar_toml)}[name]
        proc = self.registrar_host.spawn([PY, "-m", module, "--config", str(toml)], name=name)
        self.processes[name] = proc
        wait_ready(proc.log)
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.processes[name]
        proc.signal(sig)
        proc.popen.wait(10)

    def enroll_argv(self, *args: str) -> list[str]:
        verbose = [a for a in args if a == "-v"]
        rest = [a for a in args if a != "-v"]
        return [PY, "-m", "pledge_sim.cli", *verbose, "enroll", "--json",
                "--out", str(self.work / "out"), "--max-backoff", "2", *rest]

    def enroll(self, *args: str, timeout: float = 120) -> Run:
        done = self.pledge_host.run(self.enroll_argv(*args), check=False, timeout=timeout)
        return parse_run(done.returncode, done.stdout, done.stderr)

    def spawn_enroll(self, *args: str) -> tuple[LabProcess, Path]:
        """pledge-sim in the background; its JSON report goes to the returned file and its
        stderr (progress, with -v) to the process log."""
        report = self.work / f"report-{len(self.processes)}.json"
        argv = ["sh", "-c", 'exec "$@" > "$0"', str(report), *self.enroll_argv("-v", *args)]
        proc = self.pledge_host.spawn(argv, name="pledge-sim")
        self.processes[f"pledge-sim-{len(self.processes)}"] = proc
        return proc, report

    def finished(self, proc: LabProcess, report: Path, timeout: float) -> Run:
        proc.popen.wait(timeout)
        return parse_run(proc.popen.returncode, report.read_text(), proc.log())

    def store(self, role: str) -> Store:
        return Store(self.work / f"{role}.db", role)

    def logs(self) -> str:
        return "\n".join(f"--- {name} log:\n{proc.log()[-4000:]}"
                         for name, proc in self.processes.items())


def make_pki(root: Path, serials: list[str], *extra: str) -> Path:
    argv = [PY, "-m", "brski.cli.pki", "init", str(root), *extra]
    for serial in serials:
        argv += ["--serial", serial]
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return root


@contextlib.contextmanager
def environment(tmp_path: Path, serials: list[str], **config: object) -> Iterator[Env]:
    pki = make_pki(tmp_path / "pki", serials)
    with Lab(Topology(pledges=1, registrars=1, pledges_on_backbone=True),
             log_dir=tmp_path / "logs") as lab:
        registrar_ll = lab.registrars[0].address("eth0", link_local=True)
        # The registrar also listens on ::1 so a man in the middle in its namespace can reach
        # it; it announces (GRASP and mDNS) on eth0 only, with its link-local address.
        settings: dict[str, object] = dict(
            registrar_listen=[f"[{registrar_ll}%eth0]:{REGISTRAR_PORT}",
                              f"[::1]:{REGISTRAR_PORT}"],
            masa_listen=["[::1]:9444"], announce_interfaces=["eth0"], grasp_period=1.0,
            retry_after=1, masa_timeout=2.0)
        settings.update(config)
        registrar_toml, masa_toml = write_configs(pki, tmp_path / "svc", **settings)
        env = Env(lab, pki, tmp_path / "svc", registrar_toml, masa_toml)
        try:
            env.start("masa")
            env.start("registrar")
            yield env
        finally:
            print(env.logs())  # shown by pytest when the test failed


def openssl_verify(ca: Path, cert: str) -> str:
    done = subprocess.run(["openssl", "verify", "-CAfile", str(ca), cert], capture_output=True,
                          text=True, timeout=30)
    return (done.stdout + done.stderr).strip()


# -- the acceptance run ----------------------------------------------------------------------


def test_twenty_pledges_enroll_concurrently(as_root, tmp_path):
    serials = [f"e2e-{i:02d}" for i in range(20)]
    with environment(tmp_path, serials) as env:
        run = env.enroll("--pki", str(env.pki), "--count", "20", "--concurrency", "20",
                         "--deadline", "60")
        assert run.rc == 0, run.stderr + json.dumps(run.doc, indent=1)[-3000:]
        results = run.by_serial()
        assert sorted(results) == serials
        for serial, r in results.items():
            assert r["ok"] and r["assertion"] == "proximity", json.dumps(r, indent=1)
            assert r["method"] in ("grasp-registrar", "mdns-registrar")  # discovered, not given
            assert r["proxy"] == f"[{env.registrar_ll}%eth0]:{REGISTRAR_PORT}"
            assert f"serialNumber={serial}" in r["ldevid_subject"]
            assert openssl_verify(env.pki / "domain/ca.crt", r["ldevid_path"]).endswith(": OK")
            # RFC 8995 §5.1: one connection from the voucher-request to simpleenroll
            assert any("authenticated against the pinned-domain-cert and kept" in e
                       for e in r["events"]), json.dumps(r, indent=1)
            key = Path(r["ldevid_path"]).with_suffix(".key")
            assert key.stat().st_mode & 0o777 == 0o600

        with env.store("registrar") as store:
            assert {c.serial for c in store.certificates()} == set(serials)
            for serial in serials:
                assert store.pledge(serial) is not None
                assert len(store.vouchers(serial)) == 1, serial
                reports = {(t.kind, t.status) for t in store.telemetry(serial)}
                assert reports == {("voucher_status", True), ("enrollstatus", True)}, serial
            # enrollstatus came over TLS with the LDevID on record (RFC 8995 §5.9.4)
            assert all(t.client_cert_matches for t in store.telemetry()
                       if t.kind == "enrollstatus")
            assert len({t.serial for t in store.telemetry()}) == 20
        with env.store("masa") as masa:
            issued = [e for e in masa.audit_events() if e.event == "voucher"]
            assert len(issued) == 20
            assert {e.serial for e in issued} == set(serials)


# -- refusals --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One lab for the negative tests that leave the services running as they were."""
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces")
    serials = [f"neg-{i:02d}" for i in range(6)]
    with environment(tmp_path_factory.mktemp("neg"), serials) as env:
        yield env


def start_mitm(env: Env, serial: str, mode: str, server_cert: Path, server_key: Path,
               *later: str) -> LabProcess:
    idevid = env.pki / "manufacturer/idevid"
    argv = [PY, str(MITM), "--port", str(MITM_PORT),
            "--upstream", f"https://[::1]:{REGISTRAR_PORT}",
            "--server-cert", str(server_cert), "--server-key", str(server_key),
            "--client-cert", str(idevid / f"{serial}.crt"),
            "--client-key", str(idevid / f"{serial}.key"), "--mode", mode,
            "--masa-cert", str(env.pki / "masa/signer.crt"),
            "--masa-key", str(env.pki / "masa/signer.key"), *later]
    proc = env.registrar_host.spawn(argv, name=f"mitm-{mode}")
    wait_for(lambda: "mitm: ready" in proc.log() or not proc.alive(), 20, "the relay")
    assert proc.alive(), proc.log()
    return proc


def through_mitm(env: Env, serial: str, *more: str) -> Run:
    return env.enroll("--pki", str(env.pki), "--serial", serial, "--deadline", "20",
                      "--registrar", f"[{env.registrar_ll}%eth0]:{MITM_PORT}", *more)


def test_unknown_manufacturer_is_refused(shared, tmp_path):
    rogue = make_pki(tmp_path / "rogue", ["rogue-1"], "--manufacturer", "Rogue Devices")
    run = shared.enroll("--idevid", str(rogue / "manufacturer/idevid/rogue-1.crt"),
                        "--key", str(rogue / "manufacturer/idevid/rogue-1.key"),
                        "--masa-ca", str(rogue / "masa/ca.crt"), "--deadline", "20",
                        "--registrar", f"[{shared.registrar_ll}%eth0]:{REGISTRAR_PORT}")
    assert run.rc == 1
    (r,) = run.results
    assert not r["ok"] and r["code"] in ("tls-refused", "http-403"), json.dumps(r, indent=1)
    assert "rogue-1 failed" in run.stderr
    with shared.store("registrar") as store:
        assert store.certificates("rogue-1") == []


def test_registrar_cert_other_than_the_proximity_cert_gets_401(shared, tmp_path):
    # A relay shows the pledge another certificate of the same domain: the pledge puts that
    # one into proximity-registrar-cert, and the real registrar sees it is not its own.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from brski.pki import Issued

    ca_cert = x509.load_pem_x509_certificate((shared.pki / "domain/ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((shared.pki / "domain/ca.key").read_bytes(),
                                                None)
    other = issue_registrar(Issued(ca_cert, ca_key),  # type: ignore[arg-type]
                            datetime.datetime.now(datetime.UTC), names=["impostor.example"],
                            organization="Example Domain")
    write_issued(tmp_path, "impostor", other)
    relay = start_mitm(shared, "neg-00", "pass", tmp_path / "impostor.crt",
                       tmp_path / "impostor.key")
    try:
        run = through_mitm(shared, "neg-00")
    finally:
        relay.stop()
    assert run.rc == 1
    (r,) = run.results
    assert r["code"] == "http-401", json.dumps(r, indent=1)
    assert "man in the middle" in r["reason"]
    with shared.store("registrar") as store:
        assert store.vouchers("neg-00") == []


def test_tampered_voucher_is_rejected_and_reported(shared):
    relay = start_mitm(shared, "neg-01", "tamper", shared.pki / "domain/registrar.crt",
                       shared.pki / "domain/registrar.key")
    try:
        run = through_mitm(shared, "neg-01")
    finally:
        relay.stop()
    assert "mitm: tamper /.well-known/brski/requestvoucher" in relay.log()
    assert run.rc == 1
    (r,) = run.results
    assert r["code"] == "voucher-signature", json.dumps(r, indent=1)
    with shared.store("registrar") as store:
        reports = [t for t in store.telemetry("neg-01") if t.kind == "voucher_status"]
        assert reports and reports[-1].status is False
        assert "signature" in (reports[-1].reason or "")
        assert store.certificates("neg-01") == []


def test_voucher_with_a_wrong_nonce_is_rejected(shared):
    relay = start_mitm(shared, "neg-02", "renonce", shared.pki / "domain/registrar.crt",
                       shared.pki / "domain/registrar.key")
    try:
        run = through_mitm(shared, "neg-02")
    finally:
        relay.stop()
    assert "mitm: renonce" in relay.log()
    assert run.rc == 1
    (r,) = run.results
    assert r["code"] == "voucher-nonce", json.dumps(r, indent=1)
    with shared.store("registrar") as store:
        reports = [t for t in store.telemetry("neg-02") if t.kind == "voucher_status"]
        assert reports and reports[-1].status is False and "nonce" in (reports[-1].reason or "")
        assert store.certificates("neg-02") == []


def test_registrar_cert_outside_the_pinned_domain_is_refused_after_the_voucher(shared, tmp_path):
    # The first TLS session shows the real registrar certificate (so the voucher is real and
    # pins the domain CA); the re-validated session shows one from another CA. The pledge
    # must refuse it (RFC 8995 §5.6.2) and say so in voucher_status. This is the pledge that
    # opens a new connection after the voucher; the kept connection's case is below.
    elsewhere = make_pki(tmp_path / "elsewhere", [], "--domain", "Elsewhere")
    relay = start_mitm(shared, "neg-03", "pass", shared.pki / "domain/registrar.crt",
                       shared.pki / "domain/registrar.key",
                       "--later-cert", str(elsewhere / "domain/registrar.crt"),
                       "--later-key", str(elsewhere / "domain/registrar.key"))
    try:
        run = through_mitm(shared, "neg-03", "--reconnect-after-voucher")
    finally:
        relay.stop()
    assert run.rc == 1
    (r,) = run.results
    assert r["code"] == "tls-pin", json.dumps(r, indent=1)
    assert "voucher accepted" in " ".join(r["events"])  # the voucher itself was fine
    with shared.store("registrar") as store:
        reports = [t for t in store.telemetry("neg-03") if t.kind == "voucher_status"]
        assert reports and reports[-1].status is False
        assert "pinned-domain-cert" in (reports[-1].reason or "")
        assert store.certificates("neg-03") == []


@pytest.mark.parametrize(("serial", "flags"), [("neg-04", ()),
                                               ("neg-05", ("--reconnect-after-voucher",))],
                         ids=["kept-connection", "new-connection"])
def test_relay_that_gets_a_real_voucher_under_its_own_cert_is_refused_after_it(
        shared, tmp_path, serial, flags):
    # The relay shows a certificate of another domain on every TLS session and, holding the
    # pledge's IDevID key (as a test may), rewrites the voucher-request to name the real
    # registrar: the registrar and MASA grant a real voucher pinning the real domain. Only the
    # pledge's check of the server chain against that pin catches it, on the kept provisional
    # connection as on a new one (RFC 8995 §5.6.2): refused, reported, no LDevID.
    elsewhere = make_pki(tmp_path / "elsewhere", [], "--domain", "Elsewhere")
    relay = start_mitm(shared, serial, "pass", elsewhere / "domain/registrar.crt",
                       elsewhere / "domain/registrar.key",
                       "--proximity-cert", str(shared.pki / "domain/registrar.crt"))
    try:
        run = through_mitm(shared, serial, *flags)
    finally:
        relay.stop()
    assert "mitm: reprove /.well-known/brski/requestvoucher" in relay.log()
    assert run.rc == 1
    (r,) = run.results
    assert r["code"] == "tls-pin", json.dumps(r, indent=1)
    assert "voucher accepted" in " ".join(r["events"])
    assert not any("kept" in e for e in r["events"])
    with shared.store("registrar") as store:
        assert len(store.vouchers(serial)) == 1  # the voucher was real
        reports = [t for t in store.telemetry(serial) if t.kind == "voucher_status"]
        assert reports and reports[-1].status is False
        assert "pinned-domain-cert" in (reports[-1].reason or "")
        assert store.certificates(serial) == []


def test_serial_unknown_to_the_masa_gets_404_and_a_clear_error(shared):
    # Issued by the right manufacturer after the MASA's device table was written.
    subprocess.run([PY, "-m", "brski.cli.pki", "idevid", str(shared.pki), "--serial", "ghost-7"],
                   check=True, capture_output=True, timeout=60)
    run = shared.enroll("--pki", str(shared.pki), "--serial", "ghost-7", "--deadline", "20",
                        "--registrar", f"[{shared.registrar_ll}%eth0]:{REGISTRAR_PORT}")
    assert run.rc == 1
    (r,) = run.results
    assert r["code"] == "http-404", json.dumps(r, indent=1)
    assert "MASA does not know this pledge" in r["reason"]
    assert "ghost-7" in r["reason"]  # the MASA's own words, passed on by the registrar
    assert run.stderr.strip().splitlines()[-1].startswith("pledge-sim: ghost-7 failed: ")


# -- outages ---------------------------------------------------------------------------------


def test_masa_down_means_202_then_success_once_it_is_back(as_root, tmp_path):
    with environment(tmp_path, ["late-0", "late-1"]) as env:
        env.stop("masa")
        pledges, report = env.spawn_enroll("--pki", str(env.pki), "--count", "2")
        registrar = env.processes["registrar"]
        wait_for(lambda: registrar.log().count('requestvoucher HTTP/1.1" 202') >= 2, 30,
                 "the registrar to answer 202 while the MASA is down")
        env.start("masa")
        run = env.finished(pledges, report, 60)
        assert run.rc == 0, pledges.log()
        for r in run.results:
            assert r["ok"] and r["waits"] >= 1, json.dumps(r, indent=1)
            assert any("requestvoucher: 202" in e for e in r["events"])
        with env.store("registrar") as store:
            for serial in ("late-0", "late-1"):
                # One voucher-request per pledge: the same signed PVR was sent again.
                assert len(store.voucher_requests(serial)) == 1
                assert len(store.vouchers(serial)) == 1


def test_registrar_killed_and_restarted_loses_nothing(as_root, tmp_path):
    serials = [f"kill-{i:02d}" for i in range(20)]
    with environment(tmp_path, serials) as env:
        pledges, report = env.spawn_enroll(
            "--pki", str(env.pki), "--count", "20", "--concurrency", "4",
            "--registrar", f"[{env.registrar_ll}%eth0]:{REGISTRAR_PORT}")
        first = env.processes["registrar"]
        wait_for(lambda: first.log().count("LDevID issued") >= 5, 60,
                 "five enrollments before the kill")
        env.stop("registrar", signal.SIGKILL)
        with env.store("registrar") as store:
            before = {c.cert_serial for c in store.certificates()}
        assert len(before) >= 5
        wait_for(lambda: "connection refused" in pledges.log() or not pledges.alive(), 30,
                 "a pledge to find the registrar gone")
        env.start("registrar")
        run = env.finished(pledges, report, 120)
        log = pledges.log()
        assert run.rc == 0, log[-3000:]
        assert sorted(run.by_serial()) == serials
        assert any(r["attempts"] > 1 for r in run.results)  # some had to retry
        with env.store("registrar") as store:
            after = store.certificates()
            assert before <= {c.cert_serial for c in after}  # nothing issued was lost
            assert {c.serial for c in after} == set(serials)
            for serial in serials:
                assert ("enrollstatus", True) in {(t.kind, t.status)
                                                  for t in store.telemetry(serial)}
        for r in run.results:
            assert openssl_verify(env.pki / "domain/ca.crt", r["ldevid_path"]).endswith(": OK")
