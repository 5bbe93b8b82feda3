#!/usr/bin/python3
"""Which Python libraries the Debian packages take from the Debian release they are built for,
and which they bring along.

The packages are built per release (tools/build-deb.sh, each in its own release's build root):
Debian 12 "bookworm" (python3.11) and Debian 13 "trixie" (python3.13). The programs need newer
libraries than either ships (pyroute2 0.9's AsyncIPRoute, cryptography >= 42 for X.509
verification and the pinned pyOpenSSL's >= 49, prometheus-client newer than 0.21,
zeroconf's current asyncio API, aiohttp 3.14, pycose and aiocoap which Debian lacks, pyOpenSSL
>= 22 for DTLS cookies and memory-BIO MTUs, built for the vendored cryptography, and the
typing-extensions >= 4.9 it asks for on Python < 3.13 where Debian 12 has 4.4). Those are
installed from the pinned wheels, built for the release's interpreter, into a private
directory, /usr/lib/brski/vendor, which only the programs' own wrappers put on sys.path;
nothing in the system's dist-packages changes. Every other dependency comes from Debian,
where its version works (see FROM_DEBIAN for the evidence).

    vendor.py download DEST PYTHON REQUIREMENTS RELEASE
                                  make deb, before the package build: fetch the wheels of the
                                  runtime requirements (requirements.txt above the
                                  "# development and tests" line) for RELEASE's interpreter
                                  (RELEASES: its CPython version and glibc), their
                                  dependencies pinned to the versions in the project's venv.
                                  Uses the index pip is configured with; the package build
                                  itself never downloads.
    vendor.py install WHEELS TARGET SUBSTVARS RELEASE REQUIREMENTS
                                  debian/rules, in the release's build root: install every
                                  wheel in WHEELS that the runtime requirements need on this
                                  interpreter and that is not taken from RELEASE's Debian into
                                  TARGET (no index) and write ${vendor:Depends} for the ones
                                  taken from Debian.
    vendor.py policy REQUIREMENTS print the decision for every release and distribution, as
                                  JSON (tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# The Debian releases the packages are built for: the version suffix of their builds, the
# interpreter (CPython X.Y, the wheels' ABI) and the glibc (the newest manylinux tag).
RELEASES: dict[str, dict[str, str]] = {
    "bookworm": {"suffix": "~deb12u1", "python": "3.11", "glibc": "2.36"},
    "trixie": {"suffix": "~deb13u1", "python": "3.13", "glibc": "2.41"},
}

# psycopg and psycopg-pool (the PostgreSQL store) are vendored on both releases, as pure
# Python wheels that bind the system's libpq5 (brski-registrar depends on it): the store's
# tests run with the pinned 3.3 versions; Debian 12's python3-psycopg/-pool are 3.1.7, two
# minor versions older, and nothing here has run against them.
# Per release: distribution (normalized name) -> (Debian package, the Debian version it was
# checked with, why Debian's copy is used). The version becomes the minimum in Depends.
FROM_DEBIAN_BY_RELEASE: dict[str, dict[str, tuple[str, str, str]]] = {
    "bookworm": {
        "systemd-python": ("python3-systemd", "235",
                           "binds the system's libsystemd; 235 is the pinned version"),
        "asn1crypto": ("python3-asn1crypto", "1.5.1", "1.5.1 is the pinned version"),
        "attrs": ("python3-attr", "22.2.0",
                  "the project's venv (--system-site-packages) already runs on Debian's 22.2.0"),
        "cbor2": ("python3-cbor2", "5.4.6",
                  "5.4.6 passes the protocol library's byte-exact and fuzz tests (cbor2 < 6 is "
                  "required by pycose 1.1.0)"),
        "ecdsa": ("python3-ecdsa", "0.18.0", "pycose asks for any version"),
        "idna": ("python3-idna", "3.3", "yarl asks for >= 2.0"),
        "ifaddr": ("python3-ifaddr", "0.1.7",
                   "zeroconf asks for >= 0.1.7; the mDNS tests pass with it"),
        "oscrypto": ("python3-oscrypto", "1.3.0", "certvalidator asks for >= 0.16.1"),
        "six": ("python3-six", "1.16.0", "ecdsa asks for >= 1.9.0"),
    },
    # Bookworm's libraries in trixie's versions; the installed-package system test
    # (tests/test_system_nspawn.py) runs the daemons with them in a booted trixie container
    # (an enrollment, /metrics). Still vendored on trixie, as Debian 13's are too old:
    # cryptography (43; pyOpenSSL 26 asks for >= 49), pyOpenSSL (25), pyroute2 (0.7, no
    # AsyncIPRoute), aiohttp (3.11), zeroconf (0.147), prometheus-client (0.21.1: with it
    # tests/test_field_metric_series.py fails, a removed join link's series stay); pycose
    # and aiocoap are not in Debian.
    "trixie": {
        "systemd-python": ("python3-systemd", "235",
                           "binds the system's libsystemd; 235 is the pinned version"),
        "asn1crypto": ("python3-asn1crypto", "1.5.1", "1.5.1 is the pinned version"),
        "attrs": ("python3-attr", "25.3.0", "newer than bookworm's 22.2.0, which works"),
        "cbor2": ("python3-cbor2", "5.6.5",
                  "below 6 as pycose 1.1.0 requires, newer than bookworm's 5.4.6; the "
                  "system test's vouchers are made and checked with it"),
        "ecdsa": ("python3-ecdsa", "0.19.1", "pycose asks for any version"),
        "idna": ("python3-idna", "3.10", "yarl asks for >= 2.0"),
        "ifaddr": ("python3-ifaddr", "0.2.0", "zeroconf asks for >= 0.1.7"),
        "oscrypto": ("python3-oscrypto", "1.3.0", "certvalidator asks for >= 0.16.1"),
        "six": ("python3-six", "1.17.0", "ecdsa asks for >= 1.9.0"),
    },
}
# Bookworm's: the same distributions come from Debian on every release (only the minimum
# versions differ; the tests check that).
FROM_DEBIAN = FROM_DEBIAN_BY_RELEASE["bookworm"]
# In requirements.txt's runtime section but not imported by any packaged program.
NOT_PACKAGED = {
    "scapy": "used by tests only",
}
# Only joinproxyd needs python3-systemd (journald fields); it depends on it itself.
PER_PROGRAM = {"systemd-python"}

MARKER = "# development and tests"


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_requirements(requirements: Path, release: str = "bookworm") -> list[str]:
    """The pinned runtime lines of requirements.txt, without those the release's Debian
    provides."""
    from_debian = FROM_DEBIAN_BY_RELEASE[release]
    lines = []
    for raw in requirements.read_text().splitlines():
        if raw.strip() == MARKER:
            break
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = normalize(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0])
        if name in from_debian or name in NOT_PACKAGED:
            continue
        lines.append(line)
    return lines


def wheel_name(path: Path) -> str:
    return normalize(path.name.split("-", 1)[0])


def wheel_tags(release: str) -> list[str]:
    """pip's options for wheels that run on the release's interpreter: CPython X.Y's own ABI
    or the stable one, and every manylinux tag its glibc satisfies."""
    python = RELEASES[release]["python"]
    glibc_minor = int(RELEASES[release]["glibc"].split(".")[1])
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(5, glibc_minor + 1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "any"]
    return ["--python-version", python, "--implementation", "cp",
            "--abi", f"cp{python.replace('.', '')}", "--abi", "abi3", "--abi", "none",
            *[option for platform in platforms for option in ("--platform", platform)]]


def download(dest: Path, python: str, requirements: Path, release: str) -> None:
    reqs = runtime_requirements(requirements, release)
    # Pin what the requirements leave open (aiohttp's multidict, ...) to what the venv runs.
    freeze = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout
    constraints = "\n".join(line for line in freeze.splitlines()
                            if re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*==", line))
    key = hashlib.sha256("\n".join([*reqs, constraints, release, Path(__file__).read_text()])
                         .encode()).hexdigest()
    stamp = dest / ".inputs"
    if stamp.exists() and stamp.read_text() == key and any(dest.glob("*.whl")):
        return
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "requirements.txt").write_text("\n".join(reqs) + "\n")
        (Path(tmp) / "constraints.txt").write_text(constraints + "\n")
        # Binary wheels only, for the release's interpreter (not the one running pip): the
        # build root needs no compilers, and the versions are the ones the venv was tested
        # with. (pip evaluates environment markers for the running interpreter: a library
        # only older Pythons need may come along, unused.)
        done = subprocess.run(
            [python, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
             "--only-binary=:all:", *wheel_tags(release), "--dest", str(dest),
             "-r", f"{tmp}/requirements.txt", "-c", f"{tmp}/constraints.txt"],
            capture_output=True, text=True, check=False)
    noise = re.compile(r"^WARNING: Location .* is ignored")
    err = "\n".join(line for line in done.stderr.splitlines() if not noise.match(line))
    if done.returncode != 0:
        sys.exit(f"vendor.py: pip download failed:\n{err}")
    stamp.write_text(key)


def _check_requirements(vendored: list[Path], release: str = "bookworm") -> None:
    """Every requirement a vendored wheel has on a library taken from Debian must be met by
    the Debian version: otherwise that library has to be vendored too."""
    from pip._vendor.packaging.requirements import Requirement  # pip is a build dependency
    from pip._vendor.packaging.version import Version

    from_debian = FROM_DEBIAN_BY_RELEASE[release]
    problems = []
    for whl in vendored:
        with zipfile.ZipFile(whl) as zf:
            meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            text = zf.read(meta).decode()
        for line in text.splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            name = normalize(req.name)
            if name not in from_debian:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            version = from_debian[name][1]
            if not req.specifier.contains(Version(version), prereleases=True):
                problems.append(f"{whl.name} needs {req}; {release} has {version}")
    if problems:
        sys.exit("vendor.py: " + "; ".join(problems))


def _requirements_of(whl: Path) -> list[str]:
    """The distributions a wheel needs on the running interpreter (markers evaluated here)."""
    from pip._vendor.packaging.requirements import Requirement  # pip is a build dependency

    with zipfile.ZipFile(whl) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    needed = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                needed.append(normalize(req.name))
    return needed


def needed_wheels(found: list[Path], roots: list[str]) -> list[Path]:
    """The wheels the runtime requirements need on this interpreter, with their dependencies.
    pip download evaluates markers for the interpreter running it, not the release's, so a
    library only older Pythons need (typing-extensions on 3.13) may have come along."""
    by_name = {wheel_name(w): w for w in found}
    needed: set[str] = set()
    todo = [normalize(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in roots]
    while todo:
        name = todo.pop()
        if name in needed or name not in by_name:
            continue
        needed.add(name)
        todo += _requirements_of(by_name[name])
    return [w for w in found if wheel_name(w) in needed]


def install(wheels: Path, target: Path, substvars: Path, release: str,
            requirements: Path) -> None:
    found = sorted(wheels.glob("*.whl"))
    if not found:
        sys.exit(f"vendor.py: no wheels in {wheels} (tools/build-deb.sh downloads them)")
    from_debian = FROM_DEBIAN_BY_RELEASE[release]
    found = needed_wheels(found, runtime_requirements(requirements, release))
    vendored = [w for w in found if wheel_name(w) not in from_debian]
    _check_requirements(vendored, release)
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}  # no index, no constraints of the host
    for key in [k for k in env if k.startswith("PIP_") and k != "PIP_CONFIG_FILE"]:
        del env[key]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-index", "--no-deps", "--no-compile", "--no-warn-script-location",
         "--root-user-action=ignore",
         "--target", str(target), *map(str, vendored)], check=True, env=env)
    # Console scripts of the libraries (cbor2's tool, ...) are not part of the programs.
    shutil.rmtree(target / "bin", ignore_errors=True)
    for junk in target.rglob("*"):
        # Build inputs of compiled modules (Cython .pyx/.pxd, C sources) are not needed to
        # run; RECORD, INSTALLER and direct_url.json (the wheel's path in the build tree)
        # describe a pip installation that dpkg now owns.
        if junk.is_file() and (junk.suffix in {".pyx", ".pxd", ".c", ".h"}
                               or junk.name in {"RECORD", "INSTALLER", "REQUESTED",
                                                "direct_url.json"}):
            junk.unlink()
    depends = [f"{pkg} (>= {version})" for dist, (pkg, version, _) in sorted(from_debian.items())
               if dist not in PER_PROGRAM]
    with substvars.open("a") as out:
        out.write(f"vendor:Depends={', '.join(depends)}\n")
        # One verbatim description line per library (${Newline} is dpkg's; it indents the
        # next line by one space, this adds the second): a long line would be cut.
        out.write("vendor:Versions=" + "${Newline} ".join(
            f"{w.name.split('-')[0]} {w.name.split('-')[1]}" for w in vendored) + "\n")


def policy(requirements: Path) -> None:
    print(json.dumps({"releases": RELEASES,
                      "from_debian": {release: {k: list(v) for k, v in table.items()}
                                      for release, table in FROM_DEBIAN_BY_RELEASE.items()},
                      "not_packaged": NOT_PACKAGED,
                      "vendored": {release: runtime_requirements(requirements, release)
                                   for release in RELEASES}}, indent=1))


def main(argv: list[str]) -> None:
    if argv[:1] == ["download"] and len(argv) == 5 and argv[4] in RELEASES:
        download(Path(argv[1]), argv[2], Path(argv[3]), argv[4])
    elif argv[:1] == ["install"] and len(argv) == 6 and argv[4] in RELEASES:
        install(Path(argv[1]), Path(argv[2]), Path(argv[3]), argv[4], Path(argv[5]))
    elif argv[:1] == ["policy"] and len(argv) == 2:
        policy(Path(argv[1]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
