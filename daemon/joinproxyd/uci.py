"""OpenWrt's UCI configuration (/etc/config/joinproxyd) translated to joinproxyd.toml.

procd's init script runs ``joinproxyd --from-uci /etc/config/joinproxyd`` at start and at
reload; it writes /var/etc/joinproxyd.toml and prints the path the daemon is to run with.
OpenWrt's ``uci`` program is not needed: the text format is read here.

    config <type> ['<name>']        a section; the name is optional (anonymous: @type[i])
    option <name> '<value>'         one value
    list <name> '<value>'           one value appended to a list
    # ...                           a comment, at the start of a word

Values are single-quoted (taken as written), double-quoted (backslash escapes) or bare words.
Sections map to the TOML tables (see SECTIONS); ``config join`` and ``config registrar`` may
be repeated, each with ``option enabled`` (default 1). With ``option config_file`` in the
daemon section, that TOML file is run as written and nothing else may be set here.

Every error is one line that names the file, its line, the UCI option
(``joinproxyd.lan.port``) and the reason.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, load, parse
from .kernel import features

PACKAGE = "joinproxyd"  # the UCI package: /etc/config/joinproxyd
DEFAULT_UCI = Path("/etc/config/joinproxyd")
DEFAULT_OUTPUT = Path("/var/etc/joinproxyd.toml")  # OpenWrt keeps generated files in /var/etc
MAX_BYTES = 256 * 1024  # a router's configuration is a few KiB; more is not one
EXIT_CONFIG = os.EX_CONFIG  # 78: invalid, as the daemon's own
EXIT_NOTHING_TO_SERVE = os.EX_UNAVAILABLE  # 69: valid, but no join link is enabled
NAME = re.compile(r"[A-Za-z0-9_]+\Z")
INTEGER = re.compile(r"-?[0-9]+\Z")
DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?\Z")
TRUE = ("1", "yes", "on", "true", "enabled")
FALSE = ("0", "no", "off", "false", "disabled")

# section type -> option -> (TOML key, kind). Kinds: str, int, float, bool; "list:" + kind
# for a UCI list (a single `option` is taken as a list of one). Types marked "many" repeat.
Schema = dict[str, tuple[str, str]]
SECTIONS: dict[str, Schema] = {
    "daemon": {"log_level": ("log_level", "str"), "control_socket": ("control_socket", "str"),
               "drain_seconds": ("drain_seconds", "float"),
               "bpf_pin_dir": ("bpf_pin_dir", "str"),
               "bpf_object_dir": ("bpf_object_dir", "str"),
               "join_window": ("join_window", "str"),
               "config_file": ("", "str")},  # not a TOML key: see the module's docstring
    "metrics": {"listen": ("listen", "str")},
    "backbone": {"interface": ("interface", "str")},
    "join": {"enabled": ("", "bool"), "interface": ("interfaces", "list:str"),
             "mode": ("modes", "list:str"), "port": ("port", "int")},
    "registrars": {"discovery": ("discovery", "list:str"),
                   "health_interval": ("health_interval", "float"),
                   "health_timeout": ("health_timeout", "float"),
                   "constrained_mode": ("constrained_mode", "str"),
                   "core_interval": ("core_interval", "float")},
    "registrar": {"enabled": ("", "bool"), "address": ("address", "str"),
                  "port": ("port", "int"), "preference": ("preference", "int"),
                  "coaps_port": ("coaps_port", "int"), "jpy_port": ("jpy_port", "int"),
                  "cojp_port": ("cojp_port", "int"),
                  "ipip_link_local": ("ipip.link_local", "str"),
                  "ipip_address": ("ipip.address", "str"),
                  "ipip_protocol": ("ipip.protocols", "list:int"),
                  "ipip_port": ("ipip.ports", "list:int")},
    "limits": {name: (name, kind) for name, kind in (
        ("circuits_total", "int"), ("circuits_per_interface", "int"),
        ("circuits_per_pledge", "int"), ("new_circuits_per_second", "float"),
        ("new_circuits_burst", "int"), ("connect_timeout", "float"),
        ("idle_timeout", "float"), ("circuit_lifetime", "float"),
        ("flows_per_pledge", "int"), ("flows_per_interface", "int"),
        ("flow_idle_timeout", "float"))},
    "announce": {"interval": ("interval", "float"), "grasp": ("grasp", "bool"),
                 "mdns": ("mdns", "bool")},
    "guard": {"enabled": ("enabled", "bool"), "rate": ("rate", "int"),
              "burst": ("burst", "int"), "syn_rate": ("syn_rate", "int"),
              "syn_burst": ("syn_burst", "int")},
    "ipip": {"protocol": ("protocol", "int"), "backbone_prefix": ("backbone_prefix", "str"),
             "backbone_address": ("backbone_addresses", "list:str"),
             "xdp": ("xdp", "str"), "datapath": ("datapath", "str")},
    "cojp": {"rate": ("rate", "float"), "burst": ("burst", "int")},
    "jpy": {"key_rotation": ("key_rotation", "float"), "datapath": ("datapath", "str")},
    "circuit": {"splice": ("splice", "str")},
}
REPEATED = ("join", "registrar")


class UciError(Exception):
    """A UCI file that cannot be used; str() is the one line an operator needs."""


class NothingToServe(Exception):
    """A valid file without an enabled join link: the daemon is not to run."""


@dataclass
class Option:
    name: str
    values: list[str]
    is_list: bool
    line: int


@dataclass
class Section:
    type: str
    name: str | None
    line: int
    index: int  # among the sections of its type, for @type[i]
    options: dict[str, Option] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name if self.name is not None else f"@{self.type}[{self.index}]"


def _words(text: str, path: str, lineno: int) -> list[str]:
    """One line's words, with UCI's quoting; '#' at the start of a word ends the line."""
    words: list[str] = []
    i, n = 0, len(text)
    where = f"{path}:{lineno}"
    while i < n:
        if text[i] in " \t":
            i += 1
            continue
        if text[i] == "#":
            break
        word: list[str] = []
        while i < n and text[i] not in " \t":
            c = text[i]
            if c == "'":
                end = text.find("'", i + 1)
                if end < 0:
                    raise UciError(f"{where}: unterminated single quote")
                word.append(text[i + 1:end])
                i = end + 1
            elif c == '"':
                i += 1
                while True:
                    if i >= n:
                        raise UciError(f"{where}: unterminated double quote")
                    if text[i] == "\\" and i + 1 < n:
                        word.append(text[i + 1])
                        i += 2
                    elif text[i] == '"':
                        i += 1
                        break
                    else:
                        word.append(text[i])
                        i += 1
            elif c == "\\":
                if i + 1 >= n:
                    raise UciError(f"{where}: a line ending in a backslash is not supported")
                word.append(text[i + 1])
                i += 2
            else:
                word.append(c)
                i += 1
        words.append("".join(word))
    return words


def read(text: str, path: str = str(DEFAULT_UCI)) -> list[Section]:
    """The file's sections, syntax checked (names, keywords, quoting, repeats)."""
    sections: list[Section] = []
    names: dict[str, int] = {}
    counts: dict[str, int] = {}
    current: Section | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        words = _words(line, path, lineno)
        if not words:
            continue
        where = f"{path}:{lineno}"
        keyword, args = words[0], words[1:]
        if keyword == "package":
            if len(args) != 1 or args[0] != PACKAGE:
                raise UciError(f"{where}: expected 'package {PACKAGE}' (got {line.strip()!r})")
            continue
        if keyword == "config":
            if not 1 <= len(args) <= 2:
                raise UciError(f"{where}: expected config <type> ['<name>'] "
                               f"(got {line.strip()!r})")
            kind = args[0]
            name = args[1] if len(args) == 2 else None
            if not NAME.match(kind):
                raise UciError(f"{where}: {kind!r} is not a section type (letters, digits, _)")
            if name is not None:
                if not NAME.match(name):
                    raise UciError(f"{where}: {name!r} is not a section name "
                                   "(letters, digits, _)")
                if name in names:
                    raise UciError(f"{where}: {PACKAGE}.{name}: the section name is used "
                                   f"twice (also line {names[name]})")
                names[name] = lineno
            if kind not in SECTIONS:
                raise UciError(f"{where}: config {kind}: unknown section type (known: "
                               f"{', '.join(SECTIONS)})")
            current = Section(kind, name, lineno, counts.get(kind, 0))
            counts[kind] = current.index + 1
            if kind not in REPEATED and current.index > 0:
                raise UciError(f"{where}: config {kind}: only one such section is allowed")
            sections.append(current)
            continue
        if keyword in ("option", "list"):
            if current is None:
                raise UciError(f"{where}: {keyword} before the first config section")
            if len(args) != 2:
                raise UciError(f"{where}: {PACKAGE}.{current.label}: expected {keyword} "
                               f"<name> '<value>' (got {line.strip()!r})")
            name, value = args
            label = f"{PACKAGE}.{current.label}.{name}"
            if not NAME.match(name):
                raise UciError(f"{where}: {label}: not an option name (letters, digits, _)")
            if name not in SECTIONS[current.type]:
                raise UciError(f"{where}: {label}: unknown option (config {current.type} "
                               f"takes: {', '.join(SECTIONS[current.type])})")
            if "\x00" in value:
                raise UciError(f"{where}: {label}: contains a NUL character")
            previous = current.options.get(name)
            if previous is None:
                current.options[name] = Option(name, [value], keyword == "list", lineno)
            elif keyword == "list" and previous.is_list:
                previous.values.append(value)
            else:
                raise UciError(f"{where}: {label}: given twice (also line {previous.line}); "
                               "use list for several values")
            continue
        raise UciError(f"{where}: expected config, option or list (got {keyword!r})")
    return sections


def _scalar(text: str, kind: str, label: str) -> Any:
    if kind == "str":
        return text
    if kind == "bool":
        if text.lower() in TRUE:
            return True
        if text.lower() in FALSE:
            return False
        raise UciError(f"{label}: must be 1 or 0 (also yes/no, on/off, true/false) "
                       f"(got {text!r})")
    if kind == "int":
        if not INTEGER.match(text):
            raise UciError(f"{label}: must be a whole number (got {text!r})")
        return int(text)
    if not DECIMAL.match(text) or not math.isfinite(float(text)):
        raise UciError(f"{label}: must be a number (got {text!r})")
    return float(text)


@dataclass
class Translation:
    """What the file says: TOML data, or a TOML file to run as written."""

    data: dict[str, Any]
    config_file: Path | None
    # TOML key (as config.py names it in errors) -> "file:line: package.section.option"
    origins: dict[str, str]


def translate(sections: list[Section], path: str = str(DEFAULT_UCI)) -> Translation:
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    config_file: Path | None = None
    joins: list[dict[str, Any]] = []
    static: list[dict[str, Any]] = []
    for section in sections:
        schema = SECTIONS[section.type]
        values: dict[str, Any] = {}
        for option in section.options.values():
            label = f"{path}:{option.line}: {PACKAGE}.{section.label}.{option.name}"
            _key, kind = schema[option.name]
            if kind.startswith("list:"):
                values[option.name] = [_scalar(v, kind[5:], label) for v in option.values]
            elif option.is_list:
                raise UciError(f"{label}: takes one value: use option, not list")
            else:
                values[option.name] = _scalar(option.values[0], kind, label)
        where = f"{path}:{section.line}: {PACKAGE}.{section.label}"
        if section.type in REPEATED and not values.pop("enabled", True):
            continue
        if section.type == "daemon" and "config_file" in values:
            config_file = _config_file(values.pop("config_file"), sections, section, path)
            continue
        if section.type == "join":
            table: dict[str, Any] = {}
            prefix = f"join[{len(joins)}]"
            joins.append(table)
        elif section.type == "registrar":
            table = {}
            prefix = f"registrars.static[{len(static)}]"
            static.append(table)
        else:
            table = data.setdefault(section.type, {})
            prefix = section.type
        origins[prefix] = where
        for name, value in values.items():
            key = schema[name][0]
            label = f"{path}:{section.options[name].line}: {PACKAGE}.{section.label}.{name}"
            if key == "backbone_addresses":
                value = _backbone_addresses(value, label, prefix, origins)
            target = table
            if "." in key:  # registrar ipip_*: a table of its own
                sub, key = key.split(".")
                target = table.setdefault(sub, {})
            target[key] = value
            origins[f"{prefix}.{schema[name][0]}"] = label
    if config_file is not None:
        return Translation({}, config_file, origins)
    if static:
        data.setdefault("registrars", {})["static"] = static
    if not joins:
        raise NothingToServe(f"{path}: no join link is enabled (config join with "
                             "option enabled '1'): nothing to serve")
    data["join"] = joins
    return Translation(data, None, origins)


def _config_file(value: str, sections: list[Section], daemon: Section,
                 path: str) -> Path:
    label = f"{path}:{daemon.options['config_file'].line}: {PACKAGE}.{daemon.label}.config_file"
    if not value.startswith("/"):
        raise UciError(f"{label}: must be an absolute path (got {value!r})")
    others = [o for o in daemon.options if o != "config_file"]
    if others:
        raise UciError(f"{label}: the TOML file is run as written, so "
                       f"{PACKAGE}.{daemon.label}.{others[0]} would be ignored: remove one")
    for section in sections:
        if section is not daemon:
            raise UciError(f"{label}: the TOML file is run as written, so config "
                           f"{section.type} ({PACKAGE}.{section.label}, line "
                           f"{section.line}) would be ignored: remove one")
    return Path(value)


def _backbone_addresses(entries: list[str], label: str, prefix: str,
                        origins: dict[str, str]) -> dict[str, str]:
    """list backbone_address 'ifname=address' -> {ifname: address}."""
    table: dict[str, str] = {}
    for entry in entries:
        name, sep, address = entry.partition("=")
        if not sep or not name or not address:
            raise UciError(f"{label}: must be '<join link>=<IPv6 address>', e.g. "
                           f"'br-lan=fd00::1:1' (got {entry!r})")
        if name in table:
            raise UciError(f"{label}: {name} is given twice")
        table[name] = address
        origins[f"{prefix}.backbone_addresses.{name}"] = label
    return table


def explain(error: ConfigError, translation: Translation, path: str) -> str:
    """The daemon's complaint about a TOML key, said in UCI's names."""
    key = error.key
    while key:
        if key in translation.origins:
            where = translation.origins[key]
            if key != error.key:  # an option not given in a section that is: name it
                where += "." + _option_for(error.key[len(key) + 1:])
            return f"{where}: {error.reason}"
        key = key.rpartition(".")[0]
    # A key nothing set (a required one): name the option that would set it.
    table, _, leaf = error.key.partition(".")
    for kind, schema in SECTIONS.items():
        for option, (toml_key, _kind) in schema.items():
            if kind == table and toml_key == leaf:
                return f"{path}: {PACKAGE}.@{kind}[0].{option}: {error.reason}"
    return f"{path}: {error}"


def _option_for(toml_key: str) -> str:
    """The UCI option that sets a TOML key within its section (interfaces -> interface)."""
    for schema in SECTIONS.values():
        for option, (key, _kind) in schema.items():
            if key == toml_key:
                return option
    return toml_key


def toml_text(data: dict[str, Any], source: str) -> str:
    """TOML for the daemon (tables of scalars, lists and inline tables, then [[join]])."""
    lines = [f"# Generated from {source} by joinproxyd --from-uci; edit that file instead.",
             ""]
    for table, body in data.items():
        if table == "join":
            continue
        lines.append(f"[{table}]")
        lines += [f"{key} = {_value(value)}" for key, value in body.items()]
        lines.append("")
    for join in data.get("join", []):
        lines.append("[[join]]")
        lines += [f"{key} = {_value(value)}" for key, value in join.items()]
        lines.append("")
    return "\n".join(lines)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are a subset of TOML basic strings'
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_value(v)}" for k, v in value.items()) \
            + " }"
    raise TypeError(value)


def load_uci(path: Path) -> Translation:
    """Read, translate and validate ``path`` (UciError, NothingToServe)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UciError(f"{path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise UciError(f"{path}: {len(raw)} bytes is too large for a configuration "
                       f"(at most {MAX_BYTES})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise UciError(f"{path}:{line}: not UTF-8 text") from None
    translation = translate(read(text, str(path)), str(path))
    try:
        config = load(translation.config_file) if translation.config_file \
            else parse(translation.data)
    except ConfigError as exc:
        if translation.config_file is not None:  # the daemon's own words for its file
            raise UciError(f"{path}: config_file {translation.config_file}: {exc}"
                           if exc.key != str(translation.config_file)
                           else f"{path}: config_file {exc}") from None
        raise UciError(explain(exc, translation, str(path))) from None
    missing = features.missing_for(mode for spec in config.joins for mode in spec.modes)
    if missing is not None:
        raise UciError(f"{path}: {missing}")
    return translation


def write(text: str, output: Path) -> None:
    """Replace ``output`` whole: a daemon reloading mid-write never reads half a file."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except BaseException:
        os.unlink(tmp)
        raise


def run(path: Path, output: Path) -> int:
    """``joinproxyd --from-uci``: print the TOML path to run with, or one line why not."""
    try:
        translation = load_uci(path)
        if translation.config_file is None:
            write(toml_text(translation.data, str(path)), output)
    except UciError as exc:
        print(f"joinproxyd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except NothingToServe as exc:
        print(f"joinproxyd: {exc}", file=sys.stderr)
        return EXIT_NOTHING_TO_SERVE
    except OSError as exc:
        print(f"joinproxyd: {output}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(translation.config_file or output)
    return 0
