#!/usr/bin/python3
"""Write the /usr/sbin and /usr/bin wrappers of the Debian packages from pyproject.toml's
console scripts.

    wrappers.py PYPROJECT DEBIAN_DIR

It also installs the bash completion files of packaging/completion/ (one per command, named
after it), each into the package that ships the command.

A wrapper runs Debian's interpreter isolated (-I: no PYTHON* variables, no user site, not the
script's own directory on sys.path, which matters for a daemon running as root) and puts the
project's private directories before the system's dist-packages, so the vendored libraries
win over older Debian copies that may also be installed (python3-cryptography 38, ...), while
libraries taken from Debian (python3-nftables, python3-systemd, ...) stay importable.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PRIVATE = "/usr/lib/brski/python"   # the project's packages (brski, joinproxyd, registrar, ...)
VENDOR = "/usr/lib/brski/vendor"    # third-party libraries the release lacks or has too old

# console script -> the binary package that ships it; scripts not named here (joinproxy-lab,
# the namespace lab for tests and benchmarks) are not packaged.
PACKAGE_OF = {
    "joinproxyd": "joinproxyd",
    "joinproxyctl": "joinproxyd",
    "brski-registrar": "brski-registrar",
    "brski-masa": "brski-registrar",
    "brski-sztp": "brski-registrar",
    "brski-pki": "brski-registrar",
    "brski-voucher": "brski-registrar",
    "pledge-sim": "pledge-sim",
}

# Daemons go to /usr/sbin, as Debian does with the daemons an administrator runs (dnsmasq,
# radvd, frr's); the commands people type (joinproxyctl, brski-pki, ...) stay in /usr/bin.
DAEMONS = frozenset({"joinproxyd", "brski-registrar", "brski-masa", "brski-sztp"})

TEMPLATE = """\
#!/usr/bin/python3 -I
# {script}, from the Debian package {package}.
import sys

sys.path[:0] = [{private!r}, {vendor!r}]

from {module} import {function}  # noqa: E402  (after the path is set)

sys.exit({function}())
"""


def bin_dir(script: str) -> str:
    """Where a packaged console script goes, relative to the package root."""
    return "usr/sbin" if script in DAEMONS else "usr/bin"


def main(pyproject: Path, debian: Path) -> None:
    scripts = tomllib.loads(pyproject.read_text())["project"]["scripts"]
    missing = set(PACKAGE_OF) - set(scripts)
    if missing:
        sys.exit(f"wrappers.py: not in {pyproject}: {', '.join(sorted(missing))}")
    for script, target in sorted(scripts.items()):
        package = PACKAGE_OF.get(script)
        if package is None:
            continue
        module, function = target.split(":")
        if not re.fullmatch(r"[\w.]+", module) or not function.isidentifier():
            sys.exit(f"wrappers.py: {script}: unexpected entry point {target!r}")
        path = debian / package / bin_dir(script) / script
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(TEMPLATE.format(script=script, package=package, private=PRIVATE,
                                        vendor=VENDOR, module=module, function=function))
        path.chmod(0o755)
    install_completions(Path("packaging/completion"), debian)


def install_completions(source: Path, debian: Path) -> None:
    """Bash completion: packaging/completion/<script>, where it exists, goes to the package
    that ships the script (bash-completion loads it by the command's name)."""
    for script, package in sorted(PACKAGE_OF.items()):
        completion = source / script
        if completion.is_file():
            target = debian / package / "usr/share/bash-completion/completions" / script
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(completion.read_bytes())
            target.chmod(0o644)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
