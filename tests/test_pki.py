"""The test PKI: certificate contents checked with openssl, file modes, CLI errors."""

import datetime
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from brski import certs
from brski.errors import UsageError
from brski.pki import create_test_pki, issue_idevid

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
CLI = [sys.executable, "-m", "brski.cli.pki"]


def openssl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pki") / "lab"
    done = subprocess.run([*CLI, "init", str(root), "--serial", "00-D0-E5-F2-00-02",
                           "--masa-url", "masa.example:9443"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return root


def test_openssl_accepts_idevid_against_manufacturer_ca(pki_dir):
    done = openssl("verify", "-CAfile", str(pki_dir / "manufacturer/ca.crt"),
                   str(pki_dir / "manufacturer/idevid/00-D0-E5-F2-00-02.crt"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(": OK")


def test_openssl_rejects_idevid_against_another_ca(pki_dir):
    done = openssl("verify", "-CAfile", str(pki_dir / "domain/ca.crt"),
                   str(pki_dir / "manufacturer/idevid/00-D0-E5-F2-00-02.crt"))
    assert done.returncode != 0


def test_idevid_text_shows_serial_number_and_masa_url(pki_dir):
    text = openssl("x509", "-noout", "-text", "-in",
                   str(pki_dir / "manufacturer/idevid/00-D0-E5-F2-00-02.crt")).stdout
    assert "serialNumber = 00-D0-E5-F2-00-02" in text
    ext = text.split("1.3.6.1.5.5.7.1.32:", 1)[1].splitlines()[1]
    assert ext.strip().endswith("masa.example:9443")


def test_registrar_cert_has_the_ekus_brski_needs(pki_dir):
    text = openssl("x509", "-noout", "-text", "-in", str(pki_dir / "domain/registrar.crt")).stdout
    eku = text.split("X509v3 Extended Key Usage:", 1)[1].splitlines()[1]
    for usage in ("TLS Web Server Authentication", "TLS Web Client Authentication",
                  "CMC Registration Authority"):
        assert usage in eku
    done = openssl("verify", "-CAfile", str(pki_dir / "domain/ca.crt"),
                   str(pki_dir / "domain/registrar.crt"))
    assert done.returncode == 0, done.stderr


def test_masa_certs_chain_to_the_masa_ca(pki_dir):
    for leaf in ("signer", "tls"):
        done = openssl("verify", "-CAfile", str(pki_dir / "masa/ca.crt"),
                       str(pki_dir / f"masa/{leaf}.crt"))
        assert done.returncode == 0, done.stderr


def test_keys_are_private(pki_dir):
    keys = list(pki_dir.rglob("*.key"))
    assert len(keys) == 7  # 3 CAs, MASA signer and TLS, registrar, one IDevID
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_idevid_subcommand_adds_one_and_refuses_duplicates(pki_dir):
    done = subprocess.run([*CLI, "idevid", str(pki_dir), "--serial", "SN-42"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    cert = x509.load_pem_x509_certificate((pki_dir / "manufacturer/idevid/SN-42.crt").read_bytes())
    assert certs.serial_number(cert) == "SN-42"
    assert certs.masa_url(cert) == "masa.example:9443"
    again = subprocess.run([*CLI, "idevid", str(pki_dir), "--serial", "SN-42"],
                           capture_output=True, text=True)
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1 and "already exists" in again.stderr


def test_init_refuses_a_non_empty_directory(pki_dir):
    done = subprocess.run([*CLI, "init", str(pki_dir)], capture_output=True, text=True)
    assert done.returncode == 1
    assert "not empty" in done.stderr


def test_idevid_needs_an_existing_pki(tmp_path):
    done = subprocess.run([*CLI, "idevid", str(tmp_path), "--serial", "X"],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert "not a PKI made by 'brski-pki init'" in done.stderr


def test_readers_on_a_certificate_without_brski_fields():
    pki = create_test_pki(NOW)
    assert certs.masa_url(pki.domain_ca.cert) is None
    with pytest.raises(certs.ValidationError, match="serialNumber"):
        certs.serial_number(pki.registrar.cert)
    assert certs.has_cmc_ra(pki.registrar.cert)
    assert not certs.has_cmc_ra(pki.masa_tls.cert)


def test_bad_serials_and_naive_time_are_usage_errors():
    pki = create_test_pki(NOW)
    with pytest.raises(UsageError):
        issue_idevid(pki.manufacturer_ca, "../etc", "masa.example", NOW)
    with pytest.raises(UsageError):
        create_test_pki(datetime.datetime(2026, 1, 1))


def test_validity_follows_the_given_time():
    pki = create_test_pki(NOW, serials=["A"])
    idevid = pki.idevids["A"].cert
    assert idevid.not_valid_before_utc <= NOW < idevid.not_valid_after_utc
    assert idevid.not_valid_after_utc.year == 9999
    assert pki.registrar.cert.not_valid_before_utc <= NOW


@pytest.mark.parametrize("url", ["masa.example", "https://m.example/.well-known/x" + "y" * 300])
def test_ia5string_round_trip(url):
    assert certs.decode_ia5string(certs.encode_ia5string(url)) == url
