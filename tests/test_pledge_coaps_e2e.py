"""``pledge-sim enroll --transport coaps`` end to end (issue 13 item 5): constrained pledges in a
pledge namespace on the registrar's link, the real brski-registrar (CoAPS on [::]:5684, CoRE
discovery on 5683) and brski-masa. What is checked is what the pledges wrote (LDevIDs, verified
by ``openssl verify``), their JSON report, and the registrar's store (COSE vouchers, telemetry).
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from brski import cose
from brski.signed_voucher import verify_voucher_cose
from lab import Lab, Topology, wait_for
from lab.brski_services import Services, enroll, ldevid_verifies, make_pki, spawn_enroll

pytestmark = pytest.mark.netns
COAPS = 5684


class Env:
    def __init__(self, lab: Lab, pki: Path, work: Path, services: Services) -> None:
        self.lab, self.pki, self.work, self.services = lab, pki, work, services
        self.pledge = lab.pledges[0]
        self.registrar_ll = lab.registrars[0].address("eth0", link_local=True)

    def enroll(self, out: str, *args: str, timeout: float = 120, verbose: bool = True):
        return enroll(self.pledge, self.pki, self.work / out, "--transport", "coaps", *args,
                      timeout=timeout, verbose=verbose)

    @property
    def static(self) -> str:
        return f"[{self.registrar_ll}%eth0]:{COAPS}"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("pledge-coaps")
    # The MASA knows the devices in the PKI when it starts: every serial is made up front.
    fleet = [f"sim-{n:04d}" for n in range(20)]
    pki = make_pki(work / "pki", [*fleet, "solo-1", "solo-2", "disc-1", "wary-1", "late-1",
                                    "wait-1"])
    make_pki(work / "rogue", ["stranger-1"], "--manufacturer", "Rogue Manufacturer")
    with Lab(Topology(pledges=1, registrars=1, pledges_on_backbone=True),
             log_dir=work / "logs") as lab:
        services = Services(lab.registrars[0], pki, work / "r0", coaps_listen=f"[::]:{COAPS}")
        services.start()
        try:
            yield Env(lab, pki, work, services)
        finally:
            services.stop()
        assert "Traceback" not in services.log("registrar"), services.logs()


def test_twenty_constrained_pledges_enroll_at_concurrency_ten(env):
    run = env.enroll("fleet", *(a for n in range(20) for a in ("--serial", f"sim-{n:04d}")),
                     "--concurrency", "10",
                     "--registrar", env.static, timeout=240)
    assert run.ok, (run.stderr[-3000:], env.services.logs())
    assert len(run.results) == 20
    assert run.doc["enrolled"] == 20
    rate = 20 / run.doc["seconds"]
    print(f"constrained enrollments at concurrency 10: {rate:.1f}/s")
    signer = x509.load_pem_x509_certificate((env.pki / "masa/signer.crt").read_bytes())
    with env.services.store("registrar") as store:
        for r in run.results:
            serial = r["serial"]
            assert r["method"] == "static" and r["proxy"] == env.static
            assert ldevid_verifies(env.pki, r["ldevid_path"]), r
            ldevid = x509.load_pem_x509_certificate(Path(r["ldevid_path"]).read_bytes())
            assert serial in ldevid.subject.rfc4514_string()
            [record] = store.vouchers(serial)
            # The registrar keeps the MASA's COSE voucher (signed by the MASA's signer).
            voucher, _ = verify_voucher_cose(record.voucher, [signer],
                                             datetime.datetime.now(datetime.UTC),
                                             serial_number=serial)
            assert cose.decode(record.voucher).x5bag  # as the MASA sent it
            assert voucher.nonce is not None and record.nonce is not None
            kinds = {(t.kind, t.status) for t in store.telemetry(serial)}
            assert kinds == {("voucher_status", True), ("enrollstatus", True)}, kinds
            assert any(c.der == ldevid.public_bytes(Encoding.DER)
                       for c in store.certificates(serial))


def test_small_blocks_split_the_requests(env):
    big = env.enroll("big", "--serial", "solo-1", "--registrar", env.static)
    small = env.enroll("small", "--serial", "solo-2", "--registrar", env.static,
                       "--block-size", "32", "--fetch-crts")
    assert big.ok and small.ok, (big.stderr, small.stderr)

    def counts(run) -> tuple[int, int]:
        [line] = [e for e in run.results[0]["events"] if e.startswith("coaps: ")]
        words = line.split()
        return int(words[1]), int(words[5])

    def sent(run) -> int:
        return counts(run)[0]

    assert "LDevID signed by the pinned CA (§6.7.1: no /crts)" in big.results[0]["events"]
    # /crts (certs-only PKCS#7, several hundred bytes) came in 32-byte Block2 pieces, and the
    # LDevID was validated against what it holds.
    assert "LDevID chained with /crts" in small.results[0]["events"]
    assert counts(small)[1] >= counts(big)[1] + 10
    cacerts = x509.load_pem_x509_certificates(
        (env.work / "small" / "cacerts.pem").read_bytes())
    assert cacerts == [x509.load_pem_x509_certificate(
        (env.pki / "domain/ca.crt").read_bytes())]
    # rv, vs, sen, es (and Block2 follow-ups for a voucher bigger than a block) at full size;
    # with 32-byte blocks the PVR (>100 bytes) and the DER CSR (>200) go in Block1 pieces.
    assert 4 <= sent(big) <= 8
    assert sent(small) >= sent(big) + 8
    assert ldevid_verifies(env.pki, small.results[0]["ldevid_path"])


def test_core_discovery_finds_the_registrar_on_the_link(env):
    run = env.enroll("disc", "--serial", "disc-1", "--discovery-timeout", "5")
    assert run.ok, run.stderr[-3000:]
    [r] = run.results
    assert r["method"] == "coap"
    assert r["proxy"] == env.static  # the answer's source address, the brski-jp port
    assert ldevid_verifies(env.pki, r["ldevid_path"])


def test_voucher_from_an_untrusted_masa_signer_is_refused_and_reported(env):
    rogue_signer = env.work / "rogue/masa/signer.crt"
    rogue_anchor = env.work / "rogue/masa/ca.crt"
    run = env.enroll("rogue-out", "--serial", "wary-1", "--registrar", env.static,
                     "--masa-ca", str(rogue_anchor), "--masa-signer", str(rogue_signer))
    assert run.rc == 1
    [r] = run.results
    assert not r["ok"] and r["code"] == "voucher-signature", r
    assert r["ldevid_path"] is None and not list(env.work.glob("rogue-out/wary-1*"))
    [line] = run.stderr.strip().splitlines()[-1:]
    assert line.startswith("pledge-sim: wary-1 failed: voucher signature rejected"), line
    with env.services.store("registrar") as store:
        [status] = store.telemetry("wary-1")
        assert (status.kind, status.status) == ("voucher_status", False)
        assert "signature" in (status.reason or "")
        assert not store.certificates("wary-1")


def test_idevid_of_an_unknown_manufacturer_is_refused_in_the_handshake(env):
    idevids = env.work / "rogue/manufacturer/idevid"
    done = env.pledge.run(
        [sys.executable, "-m", "pledge_sim.cli", "enroll", "--json", "--transport", "coaps",
         "--idevid", str(idevids / "stranger-1.crt"), "--key", str(idevids / "stranger-1.key"),
         "--masa-ca", str(env.pki / "masa/ca.crt"), "--out", str(env.work / "stranger"),
         "--registrar", env.static, "--deadline", "30"], check=False, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    [r] = json.loads(done.stdout)["results"]
    # Refused at once with the registrar's alert, not after the deadline.
    assert r["code"] == "dtls-refused" and r["seconds"] < 15, r
    [line] = done.stderr.strip().splitlines()  # one line, without -v
    assert line.startswith("pledge-sim: stranger-1 failed: ") and "refused" in line, line
    assert "alert unknown ca" in line


def test_masa_down_gets_503_max_age_and_the_pledge_waits_then_enrolls(env):
    env.services.stop("masa")
    try:
        sim = spawn_enroll(env.pledge, env.pki, env.work / "wait", "--transport", "coaps",
                           "--serial", "wait-1", "--registrar", env.static, "--deadline", "60")
        wait_for(lambda: "5.03" in sim.log(), 30, "the pledge to get a 5.03 from rv")
    finally:
        env.services.start("masa")
    run = sim.wait(90)
    assert run.ok, run.stderr[-3000:]
    [r] = run.results
    assert r["waits"] >= 1 and r["attempts"] >= 2
    assert any("/rv answered 5.03 Service Unavailable" in e for e in r["events"]), r["events"]
    assert ldevid_verifies(env.pki, r["ldevid_path"])


def test_registrar_down_is_one_clear_line_and_non_zero(env):
    nothing = f"[{env.registrar_ll}%eth0]:{COAPS + 7}"
    run = env.enroll("down", "--serial", "late-1", "--registrar", nothing, "--deadline", "6",
                     verbose=False)
    assert run.rc == 1
    [r] = run.results
    assert r["code"] == "deadline" and not r["ok"]
    [line] = run.stderr.strip().splitlines()
    assert line.startswith("pledge-sim: late-1 failed: gave up after 6 s"), line
    assert "no DTLS handshake" in line and "registrar or proxy down" in line, line
