"""brski-sztp's RESTCONF refusals, asked by curl (an independent client) with an IDevID: each
malformed or unacceptable request gets ``ietf-restconf:errors`` with RFC 8040's status and
error-tag, in the encoding asked for, is logged with the device's serial and is counted.
Also the record and progress CLI. Real processes in a lab namespace (loopback there)."""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sztp_lab import Bootstrap, onboarding

from brski import sztp
from brski.signed_voucher import verify_voucher_cms
from lab import Lab, Topology
from lab.brski_services import make_pki
from pledge_sim.identity import load_anchors

pytestmark = pytest.mark.netns

URL = "https://[::1]:8443" + sztp.OPERATIONS
JSON = sztp.MEDIA["json"]
XML = sztp.MEDIA["xml"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Bootstrap, Path]]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    tmp = tmp_path_factory.mktemp("sztp-server")
    with Lab(Topology(pledges=0, registrars=1), log_dir=tmp / "logs") as lab:
        pki = make_pki(tmp / "pki", ["dev-1", "dev-2", "dev-3"])
        (tmp / "boot").mkdir()
        boot = Bootstrap(lab.registrars[0], pki, tmp / "boot", listen="[::1]:8443",
                         metrics="[::1]:9468")
        try:
            boot.start()
            boot.record(onboarding(config={"hostname": "x"}), serial="dev-1")
            boot.record(onboarding(config={"hostname": "y"}), serial="dev-2", sign="never")
            yield lab, boot, pki
        finally:
            print(boot.log()[-5000:])


def curl(lab: Lab, pki: Path, rpc: str, body: bytes | None, *, serial: str = "dev-1",
         content_type: str | None = JSON, accept: str | None = None,
         method: str = "POST") -> tuple[int, str, bytes]:
    idevid = pki / "manufacturer" / "idevid"
    argv = ["curl", "-sk", "--cert", str(idevid / f"{serial}.crt"), "--key",
            str(idevid / f"{serial}.key"), "-X", method, "-o", "-", "-w",
            "\n%{http_code} %{content_type}", URL + rpc]
    if content_type:
        argv += ["-H", f"Content-Type: {content_type}"]
    if accept:
        argv += ["-H", f"Accept: {accept}"]
    if body is not None:
        argv += ["--data-binary", "@-"]
    done = lab.registrars[0].run(argv, input=(body or b"").decode("latin-1"), check=False)
    out, _, tail = done.stdout.rpartition("\n")
    status, _, ctype = tail.partition(" ")
    return int(status), ctype, out.encode("latin-1")


def error(ctype: str, body: bytes) -> dict[str, str]:
    (err,) = sztp.parse_errors(body, sztp.encoding_of(ctype))
    return err


GOOD = sztp.GetBootstrappingDataInput(hw_model="m", os_name="SimOS", os_version="1.0")


@pytest.mark.parametrize(("body", "ctype", "status", "tag", "words"), [
    (b"{", JSON, 400, "malformed-message", "is not JSON"),
    (b"<input", XML, 400, "malformed-message", "is not XML"),
    (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><input/>', XML, 400,
     "malformed-message", "DOCTYPE"),
    (b'{"ietf-sztp-bootstrap-server:input": {"nonce": "AAAA"}}', JSON, 400, "invalid-value",
     "16..32"),
    (b'{"ietf-sztp-bootstrap-server:input": {"serial-number": "dev-2"}}', JSON, 400,
     "invalid-value", "unknown node 'serial-number'"),
    (b'{"input": {}}', JSON, 400, "invalid-value", "top-level member"),
    (GOOD.encode("json"), "application/json", 415, "invalid-value", "yang-data"),
], ids=["json-syntax", "xml-syntax", "xml-doctype", "short-nonce", "unknown-leaf",
        "unqualified", "media-type"])
def test_malformed_get_bootstrapping_data(server: tuple, body: bytes, ctype: str, status: int,
                                          tag: str, words: str) -> None:
    lab, boot, pki = server
    got, rtype, out = curl(lab, pki, "get-bootstrapping-data", body, content_type=ctype)
    assert got == status, out
    err = error(rtype, out)
    assert err["error-tag"] == tag and words in err["error-message"], err
    assert "dev-1" in boot.process.log()  # the refusal names the device


def test_answers_in_the_encoding_asked_for(server: tuple) -> None:
    lab, _, pki = server
    status, ctype, out = curl(lab, pki, "get-bootstrapping-data", GOOD.encode("xml"),
                              content_type=XML)
    assert (status, ctype) == (200, XML)
    got = sztp.GetBootstrappingDataOutput.decode(out, "xml")
    conveyed = sztp.unwrap_conveyed(got.conveyed_information)
    assert conveyed.signed is None and got.ownership_voucher is None  # trusted ask: unsigned
    info = sztp.decode_conveyed(conveyed.data, conveyed.encoding)
    assert json.loads(info.configuration) == {"hostname": "x"}  # type: ignore[union-attr]
    status, ctype, out = curl(lab, pki, "get-bootstrapping-data", b"{",
                              accept=XML)  # an error follows Accept too
    assert (status, ctype) == (400, XML)
    assert error(ctype, out)["error-tag"] == "malformed-message"


def test_signed_data_for_a_nonce(server: tuple) -> None:
    lab, _, pki = server
    nonce = bytes(range(16))
    body = sztp.GetBootstrappingDataInput(True, nonce=nonce).encode("json")
    status, ctype, out = curl(lab, pki, "get-bootstrapping-data", body)
    assert (status, ctype) == (200, JSON), out
    got = sztp.GetBootstrappingDataOutput.decode(out, "json")
    assert got.owner_certificate and got.ownership_voucher

    voucher, _ = verify_voucher_cms(got.ownership_voucher, load_anchors(pki / "masa/ca.crt"),
                                    datetime.datetime.now(datetime.UTC),
                                    serial_number="dev-1", nonce=nonce)
    assert voucher.nonce == nonce


def test_refusals_by_policy(server: tuple) -> None:
    lab, _boot, pki = server
    # no record for dev-3 (nor a model or default record)
    status, ctype, out = curl(lab, pki, "get-bootstrapping-data", GOOD.encode("json"),
                              serial="dev-3")
    assert status == 404 and "no bootstrapping data for serial 'dev-3'" in \
        error(ctype, out)["error-message"]
    # signed data asked for, record may not be signed: never unsigned onboarding (§7.3)
    status, ctype, out = curl(lab, pki, "get-bootstrapping-data",
                              sztp.GetBootstrappingDataInput(True).encode("json"),
                              serial="dev-2")
    assert status == 409 and error(ctype, out)["error-tag"] == "data-missing"
    # an Accept the server cannot satisfy
    status, ctype, out = curl(lab, pki, "get-bootstrapping-data", GOOD.encode("json"),
                              accept="application/json")
    assert status == 406 and error(ctype, out)["error-tag"] == "invalid-value"
    # an RPC is POST only
    status, ctype, out = curl(lab, pki, "get-bootstrapping-data", None, method="GET")
    assert status == 405 and error(ctype, out)["error-tag"] == "operation-not-supported"


def test_report_progress(server: tuple) -> None:
    lab, boot, pki = server
    status, _, out = curl(lab, pki, "report-progress",
                          sztp.ReportProgressInput("config-error", "bad line 3").encode("xml"),
                          content_type=XML, serial="dev-2")
    assert status == 204, out
    status, ctype, out = curl(lab, pki, "report-progress",
                              b'{"ietf-sztp-bootstrap-server:input": {"progress-type": "x"}}')
    assert status == 400 and "27 RFC 8572" in error(ctype, out)["error-message"]
    status, ctype, out = curl(lab, pki, "report-progress",
                              b'{"ietf-sztp-bootstrap-server:input": {}}')
    assert status == 400 and "progress-type is mandatory" in error(ctype, out)["error-message"]
    rows = boot.progress("dev-2")
    assert [(r["progress_type"], r["message"]) for r in rows] == [("config-error", "bad line 3")]
    listing = boot.cli("progress", "--config", str(boot.toml)).stdout
    assert "dev-2" in listing and "config-error" in listing and "bad line 3" in listing


def test_a_client_without_certificate_is_refused_at_tls(server: tuple) -> None:
    lab, _boot, _ = server
    done = lab.registrars[0].run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}",
                                  "-X", "POST", URL + "get-bootstrapping-data"], check=False)
    assert done.stdout in ("000", "")  # the handshake fails: no HTTP at all
    assert done.returncode != 0


def test_record_cli_refuses_bad_conveyed_information(server: tuple, tmp_path: Path) -> None:
    _, boot, _ = server
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ietf-sztp-conveyed-info:onboarding-information":
                               {"configuration": "aGk="}}))
    done = boot.cli("record", "add", "--config", str(boot.toml), "--default", "--conveyed",
                    str(bad), check=False)
    assert done.returncode == 1
    assert "configuration and configuration-handling must come together" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    listing = boot.cli("record", "list", "--config", str(boot.toml)).stdout
    assert "default" not in listing and "dev-1" in listing


def test_refusals_are_counted_by_endpoint_and_reason(server: tuple) -> None:
    lab, _, pki = server
    def count(reason: str) -> float:
        text = lab.registrars[0].run(["curl", "-s", "http://[::1]:9468/metrics"]).stdout
        line = ('brski_sztp_refusals_total{endpoint="get-bootstrapping-data",'
                f'reason="{reason}"}}')
        return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line))
    before = count("malformed")
    curl(lab, pki, "get-bootstrapping-data", b"{")
    curl(lab, pki, "get-bootstrapping-data", b"{")
    assert count("malformed") == before + 2


def test_masa_unreachable_is_503_and_the_server_lives_on(server: tuple) -> None:
    """Last in this module: it stops the MASA."""
    lab, boot, pki = server
    assert boot.services is not None
    boot.services.stop("masa")
    body = sztp.GetBootstrappingDataInput(True, nonce=bytes(16)).encode("json")
    status, ctype, out = curl(lab, pki, "get-bootstrapping-data", body)
    err = error(ctype, out)
    assert status == 503 and err["error-tag"] == "operation-failed", err
    assert err["error-message"].startswith("MASA unreachable")
    # unsigned data needs no MASA: still served
    status, _, _ = curl(lab, pki, "get-bootstrapping-data", GOOD.encode("json"))
    assert status == 200
    assert boot.process is not None and boot.process.alive()
