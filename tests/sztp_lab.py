"""Helpers for the SZTP tests: a bootstrap server (brski-sztp) beside the project's MASA on a
lab host, its records, the call-home manager, and pledge-sim sztp runs.

    pki = make_pki(tmp / "pki", serials)
    boot = Bootstrap(host, pki, tmp / "sztp", listen="[fd4a:5044::100]:8443")
    boot.start()                                   # MASA (nonceless = true), then brski-sztp
    boot.record(onboarding(...), default=True)     # brski-sztp record add
    run = sztp_devices(pledge_host, pki, tmp / "out", serials, "--server", URI)
    boot.progress()                                # brski-sztp progress --json, parsed
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brski import sztp
from lab.brski_services import PY, Services
from lab.registrar_setup import wait_ready, write_configs
from lab.topology import Host, LabProcess

SZTP = "registrar.sztp_cli"


def onboarding(*, config: dict[str, Any], handling: str = "merge",
               image: Path | None = None, image_sha256: bytes | None = None,
               os_version: str = "2.0", pre: str | None = None,
               post: str | None = None) -> sztp.OnboardingInformation:
    boot = None
    if image is not None:
        digest = image_sha256 or hashlib.sha256(image.read_bytes()).digest()
        boot = sztp.BootImage("SimOS", os_version, (f"file://{image}",), digest)
    return sztp.OnboardingInformation(
        boot_image=boot, configuration_handling=handling,
        configuration=json.dumps(config).encode(),
        pre_configuration_script=pre.encode() if pre else None,
        post_configuration_script=post.encode() if post else None)


def redirect(*servers: tuple[str, int, bytes | None]) -> sztp.RedirectInformation:
    return sztp.RedirectInformation(tuple(sztp.BootstrapServer(a, p, ta)
                                          for a, p, ta in servers))


class Bootstrap:
    """MASA + brski-sztp on one lab host, configured from a brski-pki directory."""

    def __init__(self, host: Host, pki: Path, work: Path, *, listen: str,
                 redirect_only: bool = False, owner: tuple[Path, Path] | None = None,
                 with_masa: bool = True, encoding: str = "json",
                 metrics: str | None = None) -> None:
        self.host, self.pki, self.work = host, pki, work
        self.services: Services | None = None
        if with_masa:
            self.services = Services(host, pki, work, registrar_listen=[listen],
                                     announce_interfaces=[], nonceless=True)
            registrar_toml = self.services.tomls["registrar"]
        else:
            registrar_toml, _ = write_configs(pki, work, registrar_listen=[listen])
        lines = ["[sztp]", f'registrar = "{registrar_toml}"',
                 f'listen = ["{listen}"]', f'encoding = "{encoding}"',
                 f"redirect_only = {'true' if redirect_only else 'false'}"]
        if owner is not None:
            lines += [f'owner_cert = "{owner[0]}"', f'owner_key = "{owner[1]}"']
        lines += ["", "[log]", 'level = "debug"', ""]
        self.toml = work / "sztp.toml"
        self.toml.write_text("\n".join(lines))
        self.process: LabProcess | None = None
        self.metrics = metrics

    def start(self) -> Bootstrap:
        if self.services is not None:
            self.services.start("masa")
        extra = ["--metrics", self.metrics] if self.metrics else []
        self.process = self.host.spawn([PY, "-m", SZTP, "--config", str(self.toml), *extra],
                                       name="brski-sztp")
        wait_ready(self.process.log, alive=self.process.alive)
        return self

    def log(self) -> str:
        return ((self.process.log() if self.process else "")
                + (self.services.logs() if self.services else ""))

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([PY, "-m", SZTP, *args], capture_output=True, text=True,
                              timeout=60, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"brski-sztp {' '.join(args)}: {done.stderr}")
        return done

    def record(self, info: sztp.ConveyedInformation, *, serial: str | None = None,
               model: str | None = None, sign: str = "auto", verbose: bool = False) -> None:
        path = self.work / f"record-{serial or model or 'default'}.json"
        path.write_bytes(sztp.encode_conveyed(info, "json"))
        which = (["--serial", serial] if serial else ["--model", model] if model
                 else ["--default"])
        self.cli("record", "add", "--config", str(self.toml), *which, "--conveyed", str(path),
                 "--sign", sign, *(["--verbose-reports"] if verbose else []))

    def progress(self, serial: str | None = None) -> list[dict[str, Any]]:
        args = ["progress", "--config", str(self.toml), "--json"]
        if serial:
            args += ["--serial", serial]
        return [json.loads(line) for line in self.cli(*args).stdout.splitlines()]

    @property
    def domain_ca(self) -> Path:
        return self.pki / "domain" / "ca.crt"

    def trust_anchor_cms(self) -> bytes:
        from cryptography import x509
        return sztp.degenerate_certs([x509.load_pem_x509_certificate(
            self.domain_ca.read_bytes())])


@dataclass
class DeviceRun:
    rc: int | None
    doc: dict[str, Any]
    stderr: str

    @property
    def devices(self) -> dict[str, dict[str, Any]]:
        return {d["serial"]: d for d in self.doc.get("devices", [])}


def sztp_argv(pki: Path, state: Path, serials: list[str], *args: str) -> list[str]:
    argv = [PY, "-m", "pledge_sim.cli", "-v", "sztp", "--json", "--pki", str(pki),
            "--state", str(state), "--timeout", "15"]
    for serial in serials:
        argv += ["--serial", serial]
    return [*argv, *args]


def run_devices(host: Host, pki: Path, state: Path, serials: list[str], *args: str,
                timeout: float = 120) -> DeviceRun:
    done = host.run(sztp_argv(pki, state, serials, *args), check=False, timeout=timeout)
    try:
        doc = json.loads(done.stdout)
    except ValueError:
        doc = {}
    return DeviceRun(done.returncode, doc, done.stderr)


def manager(host: Host, pki: Path, work: Path, listen: str, expect: list[str],
            count: int) -> LabProcess:
    chain = work / "manager-chain.pem"
    chain.write_bytes((pki / "domain/registrar.crt").read_bytes()
                      + (pki / "domain/ca.crt").read_bytes())
    argv = [PY, "-m", SZTP, "manager", "--listen", listen, "--ca",
            str(pki / "manufacturer/ca.crt"), "--cert", str(chain), "--key",
            str(pki / "domain/registrar.key"), "--count", str(count)]
    for serial in expect:
        argv += ["--expect", serial]
    return host.spawn(argv, name="sztp-manager")


def call_homes(proc: LabProcess) -> list[dict[str, Any]]:
    out = []
    for line in proc.log().splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
