"""``pledge-sim --transport coaps`` given a registrar by name, over IPv4 on loopback (the lab
tests use link-local IPv6): the socket follows the family the name resolves to. A name that
does not resolve is one line and exit 1. Real brski-registrar and brski-masa processes."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from lab.brski_services import ldevid_verifies, make_pki
from lab.registrar_setup import write_configs
from lab.registrar_testing import ServiceProcess, free_port


def free_udp4_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    work = tmp_path_factory.mktemp("coaps-v4")
    pki = make_pki(work / "pki", ["V4-1", "V4-2"])
    coaps = free_udp4_port()
    registrar_toml, masa_toml = write_configs(
        pki, work, masa_listen=[f"[::1]:{free_port()}"],
        registrar_listen=[f"[::1]:{free_port()}"], masa_timeout=5,
        coaps_listen=f"127.0.0.1:{coaps}")
    masa = ServiceProcess("registrar.masa_cli", masa_toml, work / "masa.log")
    registrar = ServiceProcess("registrar.cli", registrar_toml, work / "registrar.log")
    masa.start()
    try:
        registrar.start()
        yield work, pki, coaps
    finally:
        registrar.stop()
        masa.stop()


def pledge_sim(work, pki, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pledge_sim.cli", "enroll", "--transport",
                           "coaps", "--pki", str(pki), "--out", str(work / "out"), *args],
                          capture_output=True, text=True, timeout=90)


def test_registrar_by_name_over_ipv4(services):
    work, pki, coaps = services
    if "127.0.0.1" not in {i[4][0] for i in socket.getaddrinfo("localhost", coaps)}:
        pytest.fail("this host's resolver does not give 127.0.0.1 for localhost")
    done = pledge_sim(work, pki, "--count", "2", "--registrar", f"127.0.0.1:{coaps}")
    assert done.returncode == 0, done.stdout + done.stderr
    done = pledge_sim(work, pki, "--serial", "V4-2", "--registrar", f"localhost:{coaps}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"localhost:{coaps}" in done.stdout and "1 enrolled, 0 failed" in done.stdout
    assert ldevid_verifies(pki, work / "out" / "V4-2.crt")


def test_unresolvable_name_is_one_line(services):
    work, pki, _ = services
    done = pledge_sim(work, pki, "--serial", "V4-1", "--registrar",
                      "no-such-registrar.invalid:5684", "--deadline", "10")
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("pledge-sim: V4-1 failed: no-such-registrar.invalid:5684: "), line
