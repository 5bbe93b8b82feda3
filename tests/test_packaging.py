"""Packaging: the Debian packages (make deb), the OpenWrt package (make ipk), their sources.

The fast tests check the sources: the vendoring policy against what the programs import, the
versions, control fields, man pages (rst2man and man --warnings), maintainer scripts and
helper scripts (sh -n, shellcheck), the registrar units. The build tests run `make deb` and
`make ipk` (both skip the work when nothing changed) and look inside what they produced:
control fields, file lists, conffiles, the BPF objects, lintian's verdict, the procd script.
tests/test_system_nspawn.py installs and runs the .debs under systemd.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEBIAN = REPO / "packaging/debian"
MAN = REPO / "packaging/man"
SYSTEMD = REPO / "packaging/systemd"
FEED = REPO / "packaging/openwrt/joinproxyd"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]



def _load(name: str, path: Path):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vendor = _load("debian_vendor", DEBIAN / "vendor.py")  # the vendoring policy
wrappers = _load("debian_wrappers", DEBIAN / "wrappers.py")  # the /usr/{s,}bin wrappers

PACKAGED = {"brski": "brski-common", "service_notify": "brski-common", "coaps_io": "brski-common",
            "daemon/joinproxyd": "joinproxyd",
            "registrar": "brski-registrar", "pledge_sim": "pledge-sim"}
MAN_PAGES = {"joinproxyd.8": "joinproxyd", "joinproxyctl.8": "joinproxyd",
             "joinproxyd.toml.5": "joinproxyd", "brski-registrar.8": "brski-registrar",
             "brski-masa.8": "brski-registrar", "brski-pki.1": "brski-registrar",
             "brski-sztp.8": "brski-registrar",
             "brski-voucher.1": "brski-registrar", "pledge-sim.1": "pledge-sim"}


EXAMPLES = sorted((REPO / "packaging/examples").glob("*.toml"))
# Man pages that describe joinproxyd's relay modes: each names all of them.
MODE_PAGES = ("joinproxyd.8", "joinproxyctl.8", "joinproxyd.toml.5", "brski-registrar.8")


def daemon_bpf_objects() -> set[str]:
    """The object files the daemon loads (datapath.OBJECTS and, where the kernel can,
    datapath.OPTIONAL name them in kernel/bpf.py's table): what the packages ship, and
    nothing else."""
    from joinproxyd import datapath
    from joinproxyd.kernel import bpf, drop_trace

    # loaded apart from the datapath: splice.bpf.o by the circuit relay (kernel/bpf.py's
    # Splicer), trace.bpf.o while `joinproxyctl trace` runs
    return {bpf.OBJECTS[name].file for name in (*datapath.OBJECTS, *datapath.OPTIONAL)} | {
        bpf.SPLICE_OBJECT, drop_trace.OBJECT}


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)


# -- the vendoring policy ---------------------------------------------------------------------


def _wheel(directory: Path, name: str, *requires: str) -> Path:
    import zipfile

    path = directory / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}-1.0.dist-info/METADATA", "Metadata-Version: 2.1\n"
                    f"Name: {name}\nVersion: 1.0\n"
                    + "".join(f"Requires-Dist: {r}\n" for r in requires))
    return path


def test_needed_wheels_follow_markers_for_the_running_interpreter(tmp_path):
    """pip downloads for its own Python; install keeps what this interpreter needs: a
    dependency behind a marker that is false here is left out, one behind a true marker and
    an unconditional one are kept, extras are not followed."""
    old, new = f"{sys.version_info.major}.{sys.version_info.minor}", "99.0"
    wheels = [_wheel(tmp_path, "top", f"older; python_version < '{old}'",
                     f"current; python_version >= '{old}'", "always", "extra_only; extra == 'x'"),
              _wheel(tmp_path, "older"), _wheel(tmp_path, "current"), _wheel(tmp_path, "always"),
              _wheel(tmp_path, "extra_only"), _wheel(tmp_path, "future",
                                                     f"never; python_version >= '{new}'")]
    kept = {vendor.wheel_name(w) for w in vendor.needed_wheels(wheels, ["top"])}
    assert kept == {"top", "current", "always"}

def third_party_imports(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    first_party = {"brski", "joinproxyd", "registrar", "pledge_sim", "lab", "service_notify",
                   "coaps_io"}
    return {n for n in names if n not in sys.stdlib_module_names and n not in first_party}


@pytest.mark.parametrize("release", sorted(vendor.RELEASES))
def test_every_library_the_packaged_programs_import_is_vendored_or_from_debian(release):
    vendored = {vendor.normalize(re.split(r"[=<>]", line)[0])
                for line in vendor.runtime_requirements(REPO / "requirements.txt", release)}
    from_debian = set(vendor.FROM_DEBIAN_BY_RELEASE[release])
    distributions = importlib.metadata.packages_distributions()
    # Not on PyPI under a distribution name: Debian's own bindings.
    debian_only = {"nftables": "python3-nftables"}
    # Pulled in as dependencies of vendored wheels rather than named in requirements.txt.
    transitive = {"ifaddr"}
    for folder in PACKAGED:
        for module in third_party_imports(REPO / folder):
            if module in debian_only:
                continue
            dists = {vendor.normalize(d) for d in distributions.get(module, [module])}
            ok = dists & (vendored | from_debian | transitive)
            assert ok, (f"{folder} imports {module} ({dists}): add it to requirements.txt "
                        f"(vendored) or to FROM_DEBIAN in packaging/debian/vendor.py")


@pytest.mark.parametrize("release", sorted(vendor.RELEASES))
def test_runtime_requirements_stop_at_the_development_section(release):
    names = {vendor.normalize(re.split(r"[=<>]", line)[0])
             for line in vendor.runtime_requirements(REPO / "requirements.txt", release)}
    assert {"cryptography", "pyroute2", "zeroconf", "aiohttp"} <= names
    assert not names & {"pytest", "ruff", "hypothesis", "pytest-timeout"}
    assert not names & set(vendor.FROM_DEBIAN_BY_RELEASE[release])
    assert not names & set(vendor.NOT_PACKAGED)


def test_every_release_takes_the_same_libraries_from_debian():
    """What Debian 12 provides, Debian 13 provides too, at least as new (Debian 13's
    prometheus-client 0.21.1 is still too old: vendor.py). The release suffixes tell the
    builds apart."""
    from pip._vendor.packaging.version import Version

    old, new = (vendor.FROM_DEBIAN_BY_RELEASE[r] for r in ("bookworm", "trixie"))
    assert set(old) == set(new) == set(vendor.FROM_DEBIAN)
    for dist, (package, version, _) in old.items():
        assert new[dist][0] == package and Version(new[dist][1]) >= Version(version), dist
    suffixes = [r["suffix"] for r in vendor.RELEASES.values()]
    assert len(set(suffixes)) == len(suffixes) and all(s.startswith("~deb") for s in suffixes)


def test_wheel_tags_match_the_release_interpreter():
    for release, facts in vendor.RELEASES.items():
        tags = vendor.wheel_tags(release)
        assert tags[tags.index("--python-version") + 1] == facts["python"]
        assert f"cp{facts['python'].replace('.', '')}" in tags
        newest = f"manylinux_2_{facts['glibc'].split('.')[1]}_x86_64"
        assert newest in tags and "manylinux_2_99_x86_64" not in tags


def test_debian_minimums_satisfy_the_vendored_wheels(debs):
    release = debs["joinproxyd"].parent.name
    wheels = REPO / f"build/deb/wheels-{release}"  # fetched by make deb (the debs fixture)
    assert any(wheels.glob("*.whl"))
    python = vendor.RELEASES[release]["python"].replace(".", "")
    compiled = [w.name for w in wheels.glob("*.whl") if "-cp" in w.name]
    assert compiled and all(f"-cp{python}-" in n or "-abi3-" in n for n in compiled), compiled
    table = vendor.FROM_DEBIAN_BY_RELEASE[release]
    vendored = [w for w in wheels.glob("*.whl") if vendor.wheel_name(w) not in table]
    vendor._check_requirements(vendored, release)  # exits with the conflicts if any


# -- sources ----------------------------------------------------------------------------------

def test_versions_agree():
    changelog = (DEBIAN / "changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"joinproxyd ({VERSION})"), changelog
    assert f"PKG_VERSION:={VERSION}\n" in (FEED / "Makefile").read_text()


def control_paragraphs() -> list[dict[str, str]]:
    paragraphs, current, key = [], {}, ""
    for line in [*(DEBIAN / "control").read_text().splitlines(), ""]:
        if not line.strip():
            if current:
                paragraphs.append(current)
            current = {}
        elif line[0].isspace():
            current[key] += "\n" + line.strip()
        else:
            key, _, value = line.partition(":")
            current[key] = value.strip()
    return paragraphs


def test_control_declares_the_four_packages():
    source, *binaries = control_paragraphs()
    assert source["Source"] == "joinproxyd"
    assert "debhelper-compat (= 13)" in source["Build-Depends"]
    packages = {p["Package"]: p for p in binaries}
    assert set(packages) == {"brski-common", "joinproxyd", "brski-registrar", "pledge-sim"}
    assert "${vendor:Depends}" in packages["brski-common"]["Depends"]
    for name in ("python3-nftables", "python3-systemd", "brski-common (= ${binary:Version})"):
        assert name in packages["joinproxyd"]["Depends"], name
    assert "adduser" in packages["brski-registrar"]["Depends"]
    for name in ("brski-registrar", "pledge-sim"):
        assert packages[name]["Architecture"] == "all"
        assert "brski-common (>= ${source:Version})" in packages[name]["Depends"]


def test_daemons_go_to_sbin_and_the_units_start_them_there():
    """Debian's habit: daemons in /usr/sbin, commands people type in /usr/bin; each unit's
    ExecStart= and ExecReload= name the path the wrapper is written to."""
    assert {s for s in wrappers.PACKAGE_OF if wrappers.bin_dir(s) == "usr/sbin"} == {
        "joinproxyd", "brski-registrar", "brski-masa", "brski-sztp"}
    for name in ("joinproxyd.service", "brski-registrar.service", "brski-masa.service",
                 "brski-sztp.service"):
        values = unit(name)
        script = name.removesuffix(".service")
        commands = [c.split()[0] for key in ("ExecStart", "ExecReload")
                    for c in values.get(key, []) if "kill" not in c]
        assert commands and set(commands) == {f"/usr/sbin/{script}"}, (name, commands)


def test_completions_go_to_the_package_of_their_command(tmp_path):
    """packaging/completion/<command> (bash), where present, is installed by the package
    that ships the command; files for unknown names are not."""
    source = tmp_path / "completion"
    source.mkdir()
    for name in ("joinproxyctl", "brski-pki", "pledge-sim", "not-a-command"):
        (source / name).write_text(f"complete -F _{name.replace('-', '_')} {name}\n")
    debian = tmp_path / "debian"
    wrappers.install_completions(source, debian)
    found = sorted(str(p.relative_to(debian)) for p in debian.rglob("*") if p.is_file())
    where = "usr/share/bash-completion/completions"
    assert found == [f"brski-registrar/{where}/brski-pki", f"joinproxyd/{where}/joinproxyctl",
                     f"pledge-sim/{where}/pledge-sim"]


def test_shipped_configuration_names_no_join_link():
    """A fresh router serves nothing until the administrator names a join link."""
    from joinproxyd.config import load

    config = load(REPO / "packaging/joinproxyd.toml")
    assert config.joins == () and not config.needs_bpf
    assert "no join link configured" in (REPO / "packaging/joinproxyd.toml").read_text()


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_check_out(example):
    done = run([sys.executable, "-m", "joinproxyd", "--check-config", str(example)],
               timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_examples_cover_every_relay_mode_and_the_guard_off():
    from joinproxyd.config import KNOWN_MODES, load

    configs = [load(e) for e in EXAMPLES]
    assert {m for c in configs for spec in c.joins for m in spec.modes} == set(KNOWN_MODES)
    assert any(not c.needs_bpf for c in configs)  # a router without BPF
    listed = (DEBIAN / "joinproxyd.examples").read_text().split()
    assert listed == ["packaging/examples/*.toml"]


@pytest.mark.parametrize("page", MODE_PAGES)
def test_man_pages_about_relay_modes_name_ipip(page):
    text = (MAN / f"{page}.rst").read_text()
    assert "ipip" in text.lower(), page
    description = next(p for p in control_paragraphs()[1:] if p["Package"] == "joinproxyd")
    assert "IPIP" in description["Description"] or "ipip" in description["Description"]


def test_every_packaged_console_script_has_a_wrapper_and_a_man_page():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(wrappers.PACKAGE_OF) == set(scripts) - {"joinproxy-lab"}
    for script, package in wrappers.PACKAGE_OF.items():
        pages = [p for p, owner in MAN_PAGES.items() if p.rsplit(".", 1)[0] == script]
        assert pages and MAN_PAGES[pages[0]] == package, script
    for page, package in MAN_PAGES.items():
        listed = (DEBIAN / f"{package}.manpages").read_text().split()
        assert f"debian/man/{page}" in listed, (page, package)


@pytest.mark.parametrize("page", sorted(MAN_PAGES))
def test_man_page_renders_without_warnings(page, tmp_path):
    source = MAN / f"{page}.rst"
    out = tmp_path / page
    done = run(["rst2man", "--strict", "--no-generator", "--no-datestamp", str(source), str(out)])
    assert done.returncode == 0, done.stderr
    name, section = page.rsplit(".", 1)
    assert re.search(rf'^\.TH "?{re.escape(name.upper())}"? "?{section}"? ', out.read_text(),
                     re.M), out.read_text()[:500]
    done = run(["man", "--warnings", "-E", "UTF-8", "-l", str(out)],
               env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "MANWIDTH": "80"})
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "SEE ALSO" in done.stdout


MAINTAINER_SCRIPTS = sorted(p for p in DEBIAN.iterdir()
                            if p.suffix in (".postinst", ".postrm", ".prerm", ".preinst"))
SHELL_SCRIPTS = [REPO / "tools/build-deb.sh", REPO / "tools/build-ipk.sh",
                 REPO / "tools/nspawn-rootfs.sh", REPO / "tools/deb-buildroot.sh",
                 REPO / "tools/nspawn-run.sh", REPO / "tools/lintian-known-overrides.sh",
                 *sorted((REPO / "tools/vm").glob("*.sh")),
                 *sorted((REPO / "tests/vm").glob("*.sh"))]


@pytest.mark.parametrize("script", MAINTAINER_SCRIPTS + SHELL_SCRIPTS + [
    FEED / "files/joinproxyd.init"], ids=lambda p: p.name)
def test_shell_script_is_clean(script):
    shell = "bash" if script.suffix == ".sh" else "sh"
    done = run([shell, "-n", str(script)])
    assert done.returncode == 0, done.stderr
    if shutil.which("shellcheck"):
        done = run(["shellcheck", "-s", shell, str(script)])
        assert done.returncode == 0, done.stdout


def test_registrar_postinst_makes_user_state_and_pki_before_debhelper_starts_units():
    text = (DEBIAN / "brski-registrar.postinst").read_text()
    assert text.index("adduser --system") < text.index("brski-pki init") \
        < text.index("#DEBHELPER#")
    assert "runuser -u \"$USER\"" in text and "-m 0700" in text


def unit(name: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


@pytest.mark.parametrize("name", ["brski-registrar.service", "brski-masa.service",
                                  "brski-sztp.service"])
def test_registrar_units_run_unprivileged_and_verify(name, tmp_path):
    values = unit(name)
    # each its own user and state directory; brski-sztp is a door of the registrar's
    user = name.removesuffix(".service").replace("brski-sztp", "brski-registrar")
    assert values["User"] == [user] and values["Group"] == [user]
    assert values["CapabilityBoundingSet"] == [""] and values["AmbientCapabilities"] == [""]
    assert values["StateDirectory"] == [user]
    for option in ("NoNewPrivileges", "PrivateUsers", "ProtectHome", "PrivateTmp",
                   "PrivateDevices", "ProtectKernelTunables", "RestrictNamespaces"):
        assert values[option] == ["yes"], option
    assert values["ProtectSystem"] == ["strict"]
    program = values["ExecStart"][0].split()[0]
    copy = tmp_path / name
    copy.write_text((SYSTEMD / name).read_text().replace(
        program, str(Path(sys.executable).parent / Path(program).name)))
    done = run(["systemd-analyze", "verify", "--man=no", str(copy)], timeout=60)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


def test_registrar_configuration_matches_brski_pki_layout(tmp_path):
    """The shipped configs, pointed at a PKI made the way the postinst makes it, check out."""
    state = tmp_path / "state"
    done = run([sys.executable, "-m", "brski.cli.pki", "init", str(state / "pki")])
    assert done.returncode == 0, done.stderr
    pki = state / "pki"
    (state / "registrar-chain.pem").write_bytes((pki / "domain/registrar.crt").read_bytes()
                                                + (pki / "domain/ca.crt").read_bytes())
    # The MASA's state, as the postinst moves it to /var/lib/brski-masa.
    masa_state = tmp_path / "masa"
    masa_state.mkdir()
    for name in ("tls.crt", "tls.key", "signer.key"):
        (masa_state / name).write_bytes((pki / "masa" / name).read_bytes())
    (masa_state / "signer-chain.pem").write_bytes((pki / "masa/signer.crt").read_bytes()
                                                  + (pki / "masa/ca.crt").read_bytes())
    (masa_state / "manufacturer-ca.crt").write_bytes((pki / "manufacturer/ca.crt").read_bytes())
    (masa_state / "domain-ca.crt").write_bytes((pki / "domain/ca.crt").read_bytes())
    postinst = (DEBIAN / "brski-registrar.postinst").read_text()
    for name in ("signer-chain.pem", "manufacturer-ca.crt", "domain-ca.crt", "masa.db"):
        assert f'"$MASA_STATE/{name}"' in postinst, name
    for name, module in (("registrar", "registrar.cli"), ("masa", "registrar.masa_cli")):
        config = tmp_path / f"{name}.toml"
        config.write_text((DEBIAN / f"registrar-config/{name}.toml").read_text()
                          .replace("/var/lib/brski-registrar", str(state))
                          .replace("/var/lib/brski-masa", str(masa_state)))
        done = run([sys.executable, "-m", module, "--config", str(config), "--check-config"])
        assert done.returncode == 0, done.stdout + done.stderr


def test_openwrt_feed_makefile_is_a_buildroot_package():
    text = (FEED / "Makefile").read_text()
    for needle in ("include $(TOPDIR)/rules.mk", "include $(INCLUDE_DIR)/package.mk",
                   "include $(INCLUDE_DIR)/bpf.mk", "PKG_NAME:=joinproxyd",
                   "define Package/joinproxyd\n", "define Package/joinproxyd/conffiles\n"
                   "/etc/config/joinproxyd\n/etc/joinproxyd/joinproxyd.toml",
                   "USERID:=joinproxyd:joinproxyd",
                   "./files/joinproxyd.config $(1)/etc/config/joinproxyd",
                   "define Package/joinproxyd/install",
                   "$(call CompileBPF,", "./files/joinproxyd.init $(1)/etc/init.d/joinproxyd",
                   "$(eval $(call BuildPackage,joinproxyd))"):
        assert needle in text, needle
    # Recipe lines of a make define start with a tab.
    for block in re.findall(r"^define (?:Build/\w+|Package/joinproxyd/install)\n(.*?)^endef",
                            text, re.M | re.S):
        for line in block.splitlines():
            assert not line.strip() or line.startswith("\t"), line


# -- make deb -----------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=sorted(vendor.RELEASES))
def debs(request) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    """The packages of one release (build/deb/<release>/; the release is their directory)."""
    release = request.param
    done = run(["make", "-s", "deb", f"DEBIAN_RELEASES={release}"], cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = {p.name.split("_")[0]: p for p in (REPO / "build/deb" / release).glob("*.deb")}
    assert set(found) == {"brski-common", "joinproxyd", "brski-registrar", "pledge-sim"}
    suffix = vendor.RELEASES[release]["suffix"]
    assert all(p.name.split("_")[1] == VERSION + suffix for p in found.values()), found
    return found


def contents(deb: Path) -> set[str]:
    out = run(["dpkg-deb", "-c", str(deb)]).stdout
    return {line.split()[-1].lstrip(".") for line in out.splitlines()}


def control_file(deb: Path, name: str, tmp_path: Path) -> str:
    target = tmp_path / deb.name
    subprocess.run(["dpkg-deb", "-e", str(deb), str(target)], check=True)
    path = target / name
    return path.read_text() if path.exists() else ""


def unit_dir(debs: dict[str, Path]) -> str:
    """Where debhelper puts systemd units: /lib on bookworm, /usr/lib from trixie on (the
    merged /usr)."""
    return "/lib/systemd/system" if debs["joinproxyd"].parent.name == "bookworm" \
        else "/usr/lib/systemd/system"


def test_lintian_reports_no_errors(debs):
    report = (debs["joinproxyd"].parent / "lintian.txt").read_text()
    assert not [line for line in report.splitlines() if line.startswith("E:")], report


def test_joinproxyd_package(debs, tmp_path):
    files = contents(debs["joinproxyd"])
    for path in ("/usr/sbin/joinproxyd", "/usr/bin/joinproxyctl",
                 f"{unit_dir(debs)}/joinproxyd.service", "/etc/joinproxyd/joinproxyd.toml",
                 "/usr/share/man/man8/joinproxyd.8.gz", "/usr/share/man/man8/joinproxyctl.8.gz",
                 "/usr/share/man/man5/joinproxyd.toml.5.gz",
                 "/usr/lib/brski/python/joinproxyd/daemon.py"):
        assert path in files, path
    assert control_file(debs["joinproxyd"], "conffiles", tmp_path).split() == [
        "/etc/joinproxyd/joinproxyd.toml"]
    assert "/usr/bin/joinproxyd" not in files  # a daemon: /usr/sbin
    # The examples, each of which --check-config accepts (test_examples_check_out).
    assert {p for p in files if p.startswith("/usr/share/doc/joinproxyd/examples/")
            and not p.endswith("/")} == {
        f"/usr/share/doc/joinproxyd/examples/{e.name}" for e in EXAMPLES}
    # Every BPF object the daemon loads, byte for byte (strip must not touch them), and not
    # the benchmarks' baseline program.
    objects = sorted(REPO / "ebpf" / name for name in daemon_bpf_objects())
    assert all(o.exists() for o in objects), objects
    packaged = {p for p in files if p.startswith("/usr/lib/joinproxyd/bpf/") and p.endswith(".o")}
    assert packaged == {f"/usr/lib/joinproxyd/bpf/{o.name}" for o in objects}
    assert "/usr/lib/joinproxyd/bpf/bare_redirect.bpf.o" not in packaged
    if objects:
        root = tmp_path / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs["joinproxyd"]), str(root)], check=True)
        for obj in objects:
            assert (root / "usr/lib/joinproxyd/bpf" / obj.name).read_bytes() == obj.read_bytes()
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)


def test_brski_registrar_package(debs, tmp_path):
    files = contents(debs["brski-registrar"])
    for path in ("/usr/sbin/brski-registrar", "/usr/sbin/brski-masa", "/usr/bin/brski-pki",
                 "/usr/bin/brski-voucher",
                 f"{unit_dir(debs)}/brski-registrar.service",
                 f"{unit_dir(debs)}/brski-masa.service",
                 "/usr/sbin/brski-sztp", f"{unit_dir(debs)}/brski-sztp.service",
                 "/usr/share/man/man8/brski-sztp.8.gz",
                 "/usr/share/man/man8/brski-registrar.8.gz",
                 "/usr/lib/brski/python/registrar/cli.py"):
        assert path in files, path
    assert sorted(control_file(debs["brski-registrar"], "conffiles", tmp_path).split()) == [
        "/etc/brski-registrar/masa.toml", "/etc/brski-registrar/registrar.toml"]
    postinst = control_file(debs["brski-registrar"], "postinst", tmp_path)
    assert postinst.index("brski-pki init") < postinst.index("deb-systemd-invoke")


def test_pledge_sim_and_common_packages(debs):
    assert "/usr/bin/pledge-sim" in contents(debs["pledge-sim"])
    assert "/usr/share/man/man1/pledge-sim.1.gz" in contents(debs["pledge-sim"])
    common = contents(debs["brski-common"])
    assert "/usr/lib/brski/python/brski/grasp.py" in common
    assert "/usr/lib/brski/python/coaps_io/aiocoap_dtls.py" in common
    top = {p.split("/")[5] for p in common if p.startswith("/usr/lib/brski/vendor/")
           and p.count("/") > 5}
    release = debs["brski-common"].parent.name
    for name in ("cryptography", "pyroute2", "prometheus_client", "zeroconf", "aiohttp",
                 "pycose", "aiocoap"):
        assert name in top, name
    # typing-extensions: psycopg asks for it on Python < 3.13 only, psycopg-pool everywhere
    # (what the release's interpreter needs is vendored: test_needed_wheels_follow_markers).
    assert "/usr/lib/brski/vendor/typing_extensions.py" in common
    # What Debian provides is not vendored again.
    for name in ("cbor2", "asn1crypto", "attr", "idna", "ifaddr", "six", "systemd"):
        assert name not in top, name
    depends = run(["dpkg-deb", "-f", str(debs["brski-common"]), "Depends"]).stdout
    for dist, (package, version, _) in vendor.FROM_DEBIAN_BY_RELEASE[release].items():
        if dist not in vendor.PER_PROGRAM:
            assert f"{package} (>= {version})" in depends, package


def test_wrappers_put_the_vendored_libraries_first(debs, tmp_path):
    """Debian's python3-cryptography 38 may be installed too: the vendored one must win."""
    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(debs["brski-common"]), str(root)], check=True)
    subprocess.run(["dpkg-deb", "-x", str(debs["joinproxyd"]), str(root)], check=True)
    wrapper = (root / "usr/sbin/joinproxyd").read_text()
    assert wrapper.startswith("#!/usr/bin/python3 -I\n")
    probe = wrapper.replace("/usr/lib/brski", str(root / "usr/lib/brski")).split(
        "from joinproxyd")[0] + (
        "import cryptography, pyroute2, multidict._multidict as compiled\n"
        "print(cryptography.__version__, pyroute2.AsyncIPRoute.__name__, compiled.__file__)\n")
    # With the release's own interpreter: the host's if it runs that release, else the one
    # of the release's build root (tools/deb-buildroot.sh), the package root bound in.
    release = debs["joinproxyd"].parent.name
    host = re.search(r"^VERSION_CODENAME=(\S+)", Path("/etc/os-release").read_text(), re.M)
    argv = ["/usr/bin/python3", "-I", "-c", probe]
    if not host or host.group(1) != release:
        (buildroot,) = [p for p in (REPO / "build/debroot").glob(f"{release}-*") if p.is_dir()]
        argv = [str(REPO / "tools/nspawn-run.sh"), str(buildroot), f"jppkg-{release}-{os.getpid()}",
                "--volatile=overlay", "--private-network", f"--bind-ro={root}:{root}", "--",
                *argv]
    done = run(argv, timeout=120)
    assert done.returncode == 0, done.stderr
    version, name, where = done.stdout.split()
    pinned = dict(line.split("==") for line in vendor.runtime_requirements(
        REPO / "requirements.txt") if "==" in line)
    assert version == pinned["cryptography"].split()[0] and name == "AsyncIPRoute"
    # A compiled module of a vendored wheel: built for the release's interpreter, it loads.
    assert where.startswith(str(root / "usr/lib/brski/vendor")) and where.endswith(".so")


# -- make ipk -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ipk(tmp_path_factory) -> Path:
    assert list(REPO.glob("ebpf/*.bpf.c")), "the ipk carries the BPF programs: none in ebpf/"
    done = run(["make", "-s", "ipk"], cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (package,) = (REPO / "build/ipk").glob("joinproxyd_*.ipk")
    out = tmp_path_factory.mktemp("ipk")
    with tarfile.open(package) as outer:
        assert sorted(outer.getnames()) == ["./control.tar.gz", "./data.tar.gz",
                                            "./debian-binary"]
        outer.extractall(out)  # our own archive, just built
    for part in ("control", "data"):
        (out / part).mkdir()
        with tarfile.open(out / f"{part}.tar.gz") as inner:
            assert all(m.uid == 0 and m.gid == 0 for m in inner.getmembers())
            inner.extractall(out / part)
    return out


def test_ipk_control(ipk):
    assert (ipk / "debian-binary").read_text() == "2.0\n"
    fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", (ipk / "control/control").read_text(),
                             re.M))
    assert fields["Package"] == "joinproxyd"
    release = re.search(r"^PKG_RELEASE:=(\d+)$", (FEED / "Makefile").read_text(), re.M)[1]
    assert fields["Version"] == f"{VERSION}-{release}"
    assert fields["Architecture"] == "x86_64"
    assert {"python3", "python3-ifaddr", "procd-ujail"} <= {
        d.strip() for d in fields["Depends"].split(",")}
    assert int(fields["Installed-Size"]) > 0
    assert fields["License"] == "Apache-2.0" and fields["Maintainer"]
    assert (ipk / "control/conffiles").read_text().split() == [
        "/etc/config/joinproxyd", "/etc/joinproxyd/joinproxyd.toml"]
    assert fields["Require-User"] == "joinproxyd:joinproxyd"  # default_postinst adds it
    for script in ("postinst", "prerm"):
        assert run(["sh", "-n", str(ipk / "control" / script)]).returncode == 0
        assert f"default_{script}" in (ipk / "control" / script).read_text()


def test_ipk_files(ipk):
    data = ipk / "data"
    files = {"/" + str(p.relative_to(data)) for p in data.rglob("*") if p.is_file()}
    for path in ("/usr/sbin/joinproxyd", "/usr/bin/joinproxyctl", "/etc/init.d/joinproxyd",
                 "/etc/joinproxyd/joinproxyd.toml", "/etc/config/joinproxyd",
                 "/etc/capabilities/joinproxyd.json",
                 "/usr/lib/joinproxyd/python/joinproxyd/daemon.py",
                 "/usr/lib/joinproxyd/python/brski/grasp.py",
                 "/usr/lib/joinproxyd/vendor/pyroute2/__init__.py",
                 "/usr/lib/joinproxyd/vendor/zeroconf/_dns.py"):
        assert path in files, path
    assert {p for p in files if p.startswith("/usr/lib/joinproxyd/bpf/")} == {
        f"/usr/lib/joinproxyd/bpf/{name}" for name in daemon_bpf_objects()}
    # Pure Python for any OpenWrt target; no registrar or lab on a router.
    assert not [p for p in files if p.endswith(".so") or "__pycache__" in p]
    assert not [p for p in files if "/registrar/" in p or "/lab/" in p]
    for path in ("usr/sbin/joinproxyd", "usr/bin/joinproxyctl", "etc/init.d/joinproxyd"):
        assert (data / path).stat().st_mode & 0o111, path


def test_ipk_configuration_uses_openwrt_names_and_checks_out(ipk):
    config = ipk / "data/etc/joinproxyd/joinproxyd.toml"
    parsed = tomllib.loads(config.read_text())
    assert parsed["backbone"]["interface"] == "wan"
    # No join link until the operator sets one (UCI or this file); the example names br-lan.
    assert "join" not in parsed
    assert '#interfaces = ["br-lan"]' in config.read_text()
    # OpenWrt's runtime directory, the one the init script makes for the jailed daemon
    assert parsed["daemon"]["control_socket"] == "/var/run/joinproxyd/control.sock"
    done = run([sys.executable, "-m", "joinproxyd", "--check-config", str(config)])
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_ipk_code_runs_from_its_private_directories(ipk):
    data = ipk / "data"
    wrapper = (data / "usr/sbin/joinproxyd").read_text().replace(
        "/usr/lib/joinproxyd", str(data / "usr/lib/joinproxyd"))
    probe = wrapper.split("from joinproxyd")[0] + (
        "import joinproxyd.daemon, zeroconf, cbor2, pyroute2, prometheus_client, json\n"
        "print(json.dumps([m.__file__ for m in (joinproxyd, zeroconf, cbor2, pyroute2,"
        " prometheus_client)]))\n")
    done = run([sys.executable, "-I", "-c", probe])
    assert done.returncode == 0, done.stderr
    for path in json.loads(done.stdout):
        assert path.startswith(str(data / "usr/lib/joinproxyd")), path


def test_ipk_joinproxyctl_looks_for_the_socket_where_openwrt_keeps_it(ipk):
    data = ipk / "data"
    wrapper = (data / "usr/bin/joinproxyctl").read_text().replace(
        "/usr/lib/joinproxyd", str(data / "usr/lib/joinproxyd"))
    done = run([sys.executable, "-I", "-c", wrapper, "status"])
    assert done.returncode != 0
    assert done.stderr.strip() == "joinproxyctl: /var/run/joinproxyd/control.sock: no such " \
        "socket; is joinproxyd running?", done.stderr
    uci = (data / "etc/config/joinproxyd").read_text()
    assert "option control_socket '/var/run/joinproxyd/control.sock'" in uci
    assert re.search(r"^RUN_DIR=/var/run/joinproxyd$", (data / "etc/init.d/joinproxyd")
                     .read_text(), re.M)


def init_script_run(script: Path, tmp_path: Path, uci_text: str, commands: str,
                    daemon: list[str] | None = None) -> list[str]:
    """Run the init script's functions against recording stand-ins for procd.sh, rc.common
    and chown, with this checkout's joinproxyd as the daemon, or ``daemon`` (paths moved
    into tmp_path, shown as T)."""
    calls = tmp_path / "calls"
    calls.write_text("")
    uci_conf = tmp_path / "config/joinproxyd"
    uci_conf.parent.mkdir(exist_ok=True)
    uci_conf.write_text(uci_text)
    prog = tmp_path / "joinproxyd"
    prog.write_text(f"#!/bin/sh\necho \"daemon $*\" >> {calls}\n"
                    f"exec {shlex.join(daemon or [sys.executable, '-m', 'joinproxyd'])} "
                    "\"$@\"\n")
    prog.chmod(0o755)
    harness = f"""
        procd_open_instance() {{ echo open >> {calls}; }}
        procd_set_param() {{ echo "param $*" >> {calls}; }}
        procd_close_instance() {{ echo close >> {calls}; }}
        procd_add_reload_trigger() {{ echo "trigger $*" >> {calls}; }}
        procd_add_jail() {{ echo "jail $*" >> {calls}; }}
        mount() {{ echo "mount $*" >> {calls}; }}
        logger() {{ echo "logger $*" >> {calls}; }}
        chown() {{ echo "chown $*" >> {calls}; return "${{CHOWN_FAILS:-0}}"; }}
        start() {{ echo start >> {calls}; }}
        stop() {{ echo stop >> {calls}; }}
        . {script}
        PROG={prog} UCI_CONF={uci_conf} CONF={tmp_path}/var/etc/joinproxyd.toml
        RUN_DIR={tmp_path}/run PIN_DIR={tmp_path}/bpf/joinproxyd
        {commands.replace(";", f"; echo status $? >> {calls};")}
        echo status $? >> {calls}
    """
    done = run(["sh", "-c", harness])
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return calls.read_text().replace(str(tmp_path), "T").splitlines()


def test_ipk_init_script_translates_uci_and_runs_jailed_with_procd(ipk, tmp_path):
    script = ipk / "data/etc/init.d/joinproxyd"
    text = script.read_text()
    assert text.startswith("#!/bin/sh /etc/rc.common\n")
    assert re.search(r"^USE_PROCD=1$", text, re.M)
    assert re.search(r"^PROG=/usr/sbin/joinproxyd$", text, re.M)
    assert run(["sh", "-n", str(script)]).returncode == 0
    shipped = (ipk / "data/etc/config/joinproxyd").read_text()
    enabled = shipped.replace("option enabled '0'", "option enabled '1'")
    translate = "daemon --from-uci T/config/joinproxyd --write-config T/var/etc/joinproxyd.toml"
    recorded = init_script_run(script, tmp_path, enabled,
                               "start_service; reload_service; service_triggers")
    assert recorded == [
        translate, "chown joinproxyd:joinproxyd T/run", "mount -t bpf bpf T/bpf", "open",
        "param command T/joinproxyd --config T/var/etc/joinproxyd.toml",
        "param respawn 3600 5 5",
        "param file T/config/joinproxyd T/var/etc/joinproxyd.toml",
        "param reload_signal HUP", "jail joinproxyd requirejail", "param user joinproxyd",
        "param group joinproxyd",
        "param capabilities /etc/capabilities/joinproxyd.json", "param no_new_privs 1",
        "param stdout 1", "param stderr 1", "close", "status 0",
        translate, "start", "status 0", "trigger joinproxyd", "status 0"], recorded
    generated = tomllib.loads((tmp_path / "var/etc/joinproxyd.toml").read_text())
    assert generated["join"] == [{"interfaces": ["br-lan"], "modes": ["circuit"],
                                  "port": 8443}]
    # As installed: nothing to serve, so no instance; a reload of it stops a running one.
    recorded = init_script_run(script, tmp_path, shipped, "start_service; reload_service")
    assert recorded[1].startswith("logger -t joinproxyd not started: joinproxyd: ")
    assert recorded[1].endswith("no join link is enabled (config join with option enabled "
                                "'1'): nothing to serve"), recorded
    assert recorded == [translate, recorded[1], "status 1", translate, recorded[1], "stop",
                        "status 0"], recorded
    # A mistake: logged with the UCI option, and a reload leaves the running daemon alone.
    broken = enabled.replace("option port '8443'", "option port '8443x'")
    recorded = init_script_run(script, tmp_path, broken, "start_service; reload_service")
    line = ("logger -t joinproxyd not started: joinproxyd: T/config/joinproxyd:32: "
            "joinproxyd.lan.port: must be a whole number (got '8443x')")
    assert recorded == [translate, line, "status 1", translate, line, "status 1"], recorded
    # No user joinproxyd (installed without its scripts): not started as root instead.
    recorded = init_script_run(script, tmp_path, enabled, "CHOWN_FAILS=1; start_service")
    assert recorded == [
        "status 0", translate, "chown joinproxyd:joinproxyd T/run",
        "logger -t joinproxyd not started: cannot give T/run to the user joinproxyd (the "
        "package's postinst creates the user: reinstall joinproxyd)", "status 1"], recorded


def test_ipk_capabilities_are_procds_json_with_only_what_the_daemon_needs(ipk):
    caps = json.loads((ipk / "data/etc/capabilities/joinproxyd.json").read_text())
    needed = ["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_BPF", "CAP_PERFMON"]
    assert caps == {name: needed for name in ("bounding", "effective", "ambient",
                                              "permitted", "inheritable")}
