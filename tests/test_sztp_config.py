"""brski-sztp's configuration: the shipped example checks out against a brski-pki layout, and
bad files are refused with the key and the reason (exit 78), as the registrar's are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from brski import sztp
from lab.brski_services import make_pki
from lab.registrar_setup import write_configs
from registrar.sztp_config import ConfigError, load_sztp_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "packaging/examples/sztp"


@pytest.fixture(scope="module")
def registrar_toml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sztp-config")
    pki = make_pki(tmp / "pki", ["d-1"])
    other = make_pki(tmp / "other", [])
    toml, _ = write_configs(pki, tmp / "conf")
    (tmp / "other-key").write_bytes((other / "domain/registrar.key").read_bytes())
    return toml


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sztp.toml"
    path.write_text(text)
    return path


def test_the_shipped_example_loads(registrar_toml: Path, tmp_path: Path) -> None:
    text = (EXAMPLE / "sztp.toml").read_text().replace(
        "/etc/brski-registrar/registrar.toml", str(registrar_toml))
    config = load_sztp_config(write(tmp_path, text))
    assert config.encoding == "json" and not config.redirect_only
    assert config.owner_chain[0] == config.registrar.server_cert  # the default owner
    info = sztp.decode_conveyed((EXAMPLE / "onboarding.json").read_bytes(), "json")
    assert isinstance(info, sztp.OnboardingInformation)


@pytest.mark.parametrize(("body", "words"), [
    ("[sztp]\n", "registrar"),
    ('[sztp]\nregistrar = "/nonexistent.toml"\n', "registrar"),
    ('[sztp]\nregistrar = "REG"\nencoding = "cbor"\n', "encoding"),
    ('[sztp]\nregistrar = "REG"\nowner_cert = "REG"\n', "owner_key"),
    ('[sztp]\nregistrar = "REG"\nlisten = ["nowhere"]\n', "listen"),
    ('[sztp]\nregistrar = "REG"\nbogus = 1\n', "bogus"),
])
def test_bad_configuration_names_the_key(registrar_toml: Path, tmp_path: Path, body: str,
                                         words: str) -> None:
    path = write(tmp_path, body.replace("REG", str(registrar_toml)))
    with pytest.raises(ConfigError, match=words):
        load_sztp_config(path)
    done = subprocess.run([sys.executable, "-m", "registrar.sztp_cli", "--config", str(path),
                           "--check-config"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 78, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and words in done.stderr


def test_owner_key_must_match_the_owner_certificate(registrar_toml: Path,
                                                    tmp_path: Path) -> None:
    pki = registrar_toml.parent.parent / "pki"
    path = write(tmp_path, f'[sztp]\nregistrar = "{registrar_toml}"\n'
                           f'owner_cert = "{pki / "domain/registrar.crt"}"\n'
                           f'owner_key = "{registrar_toml.parent.parent / "other-key"}"\n')
    with pytest.raises(ConfigError, match="does not belong to the certificate"):
        load_sztp_config(path)
