"""brski-voucher: decode / verify / sign, the acceptance check against RFC 8995 vectors."""

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from brski.cli.voucher import main
from brski.pki import create_test_pki
from brski.voucher import Assertion, Voucher, encode_json

APPC = "anima-bootstrap/examples"
COSE = "constrained-voucher/examples/cose-examples"
SCRIPT = Path(sys.executable).parent / "brski-voucher"
SERIAL = "00-D0-E5-F2-00-02"


def run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), *map(str, args)], capture_output=True, text=True, check=False, timeout=60
    )


def cli(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- the acceptance check, through the installed console script ------------------------------


@pytest.fixture(scope="module")
def script() -> Path:
    assert SCRIPT.exists(), f"{SCRIPT} not installed: run 'make setup'"
    return SCRIPT


def test_acceptance_verify_decode_and_one_byte_change(vectors, script, tmp_path):
    pkcs = vectors / APPC / "voucher_00-D0-E5-F2-00-02.pkcs"
    masa = vectors / APPC / "masa.crt"
    ok = run("verify", pkcs, "--trust", masa, "--at", "2021-04-14T00:00:00Z")
    assert ok.returncode == 0, ok.stderr
    assert SERIAL in ok.stdout

    decoded = run("decode", pkcs)
    assert decoded.returncode == 0, decoded.stderr
    assert json.loads(decoded.stdout)["ietf-voucher:voucher"]["serial-number"] == SERIAL

    # one byte of the PEM text changed, inside the base64 of the JSON payload
    text = bytearray(pkcs.read_bytes())
    index = text.index(b"ZXIiOnsiYXNzZXJ0")  # base64 of 'er":{"assert'
    text[index] = ord("a") if text[index] != ord("a") else ord("b")
    bad = tmp_path / "voucher-changed.pkcs"
    bad.write_bytes(bytes(text))
    failed = run("verify", bad, "--trust", masa, "--at", "2021-04-14T00:00:00Z")
    assert failed.returncode == 1
    assert one_line(failed.stderr).startswith("brski-voucher: invalid:")


def test_vendor_ca_as_anchor_and_pledge_checks(vectors, capsys):
    pkcs = vectors / APPC / "voucher_00-D0-E5-F2-00-02.pkcs"
    vendor = vectors / APPC / "vendor.crt"
    args = ("verify", pkcs, "--trust", vendor, "--at", "2021-04-14T00:00:00Z")
    code, out, _ = cli(capsys, *args, "--serial", SERIAL, "--nonce=-_XE9zK9q8Ll1qylMtLKeg")
    assert code == 0 and "highway-test.example.com MASA" in out
    code, _, err = cli(capsys, *args, "--serial", "00-D0-E5-F2-00-03")
    assert code == 1 and "serial-number" in one_line(err)
    code, _, err = cli(capsys, *args, "--nonce", "AAAAAAAAAAAAAAAAAAAAAA")
    assert code == 1 and "nonce" in one_line(err)


def test_verify_uses_the_clock_by_default(vectors, capsys):
    # the App. C certificates expired long ago: without --at, verification must fail
    pkcs = vectors / APPC / "voucher_00-D0-E5-F2-00-02.pkcs"
    code, _, err = cli(capsys, "verify", pkcs, "--trust", vectors / APPC / "vendor.crt")
    assert code == 1 and "expired or not yet valid" in one_line(err)


@pytest.mark.parametrize(
    ("file", "trust", "kind"),
    [
        (f"{APPC}/vr_00-D0-E5-F2-00-02.b64", f"{APPC}/vendor.crt", "CMS voucher-request"),
        (f"{APPC}/parboiled_vr_00-D0-E5-F2-00-02.pkcs", f"{APPC}/ownerca_secp384r1.crt",
         "CMS voucher-request"),
        (f"{COSE}/voucher.hex", f"{COSE}/masa_ca.pem", "COSE voucher"),
        (f"{COSE}/pvr.hex", f"{COSE}/pledge.der", "COSE voucher-request"),
        (f"{COSE}/rvr.hex", f"{COSE}/domain_ca.der", "COSE voucher-request"),
    ],
)  # fmt: skip
def test_verify_every_signed_vector(vectors, capsys, file, trust, kind):
    at = "2023-01-01T00:00:00Z" if file.startswith(COSE) else "2021-04-14T00:00:00Z"
    code, out, err = cli(capsys, "verify", vectors / file, "--trust", vectors / trust, "--at", at)
    assert code == 0, err
    assert out.startswith(f"valid {kind} for serial-number ")


@pytest.mark.parametrize(
    ("file", "serial"),
    [
        (f"{APPC}/vr_00-D0-E5-F2-00-02.json", SERIAL),  # folded at 60 columns, as published
        (f"{APPC}/voucher_00-D0-E5-F2-00-02.b64", SERIAL),
        (f"{COSE}/voucher.hex", "JADA123456789"),
        (f"{COSE}/rvr-nonsigned.hex", "JADA123456789"),
    ],
)
def test_decode_formats(vectors, capsys, file, serial):
    code, out, _ = cli(capsys, "decode", vectors / file)
    assert code == 0
    (body,) = json.loads(out).values()
    assert body["serial-number"] == serial


def test_verify_refuses_unsigned_input(vectors, capsys):
    code, _, err = cli(
        capsys, "verify", vectors / COSE / "voucher-nonsigned.hex",
        "--trust", vectors / COSE / "masa_ca.der",
    )  # fmt: skip
    assert code == 1 and "not signed" in one_line(err)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("verify", "/nonexistent/file", "--trust", "/nonexistent/ca"), "No such file"),
        (("decode", "/nonexistent/file"), "No such file"),
    ],
)
def test_missing_files_exit_2(capsys, args, message):
    code, _, err = cli(capsys, *args)
    assert code == 2 and message in one_line(err)


def test_bad_time_and_garbage(vectors, capsys, tmp_path):
    pkcs = vectors / APPC / "voucher_00-D0-E5-F2-00-02.pkcs"
    code, _, err = cli(capsys, "verify", pkcs, "--trust", vectors / APPC / "vendor.crt",
                       "--at", "yesterday")  # fmt: skip
    assert code == 2 and "--at" in one_line(err)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01\x02 not a voucher")
    code, _, err = cli(capsys, "decode", junk)
    assert code == 1 and one_line(err).startswith("brski-voucher: invalid:")
    code, _, err = cli(capsys, "verify", pkcs, "--trust", junk)
    assert code == 2 and "certificate" in one_line(err)


# --- sign, then verify what was signed -------------------------------------------------------


@pytest.fixture
def lab(tmp_path: Path) -> dict[str, Path]:
    now = datetime.now(UTC)
    pki = create_test_pki(now - timedelta(hours=1))
    files = {
        "key": pki.masa_signer.key_pem(),
        "cert": pki.masa_signer.cert_pem(),
        "ca": pki.masa_ca.cert_pem(),
        "json": encode_json(
            Voucher(
                serial_number="LAB-7",
                assertion=Assertion.LOGGED,
                created_on=now,
                nonce=b"\x07" * 16,
                pinned_domain_cert=pki.domain_ca.cert.public_bytes(serialization.Encoding.DER),
            )
        ),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    return paths


@pytest.mark.parametrize("fmt", ["cms", "cose"])
def test_sign_then_verify(capsys, lab, tmp_path, fmt):
    out = tmp_path / f"signed.{fmt}"
    code, _, err = cli(capsys, "sign", "--in", lab["json"], "--key", lab["key"],
                       "--cert", lab["cert"], "--format", fmt, "--out", out)  # fmt: skip
    assert code == 0, err
    code, stdout, err = cli(capsys, "verify", out, "--trust", lab["ca"], "--serial", "LAB-7")
    assert code == 0, err
    assert f"valid {fmt.upper()} voucher for serial-number LAB-7" in stdout


def test_sign_refuses_an_invalid_voucher(capsys, lab, tmp_path):
    doc = json.loads(lab["json"].read_bytes())
    del doc["ietf-voucher:voucher"]["pinned-domain-cert"]
    lab["json"].write_text(json.dumps(doc))
    code, _, err = cli(capsys, "sign", "--in", lab["json"], "--key", lab["key"],
                       "--cert", lab["cert"], "--out", tmp_path / "x")  # fmt: skip
    assert code == 1 and "pinned-domain" in one_line(err)
    assert not (tmp_path / "x").exists()


def test_sign_with_a_key_that_is_not_a_key(capsys, lab, tmp_path):
    code, _, err = cli(capsys, "sign", "--in", lab["json"], "--key", lab["cert"],
                       "--cert", lab["cert"], "--out", tmp_path / "x")  # fmt: skip
    assert code == 2 and "private key" in one_line(err)
