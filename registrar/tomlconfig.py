"""Reading a TOML service configuration with errors that name the key and the reason.

Shared by the registrar (``registrar.config``) and the MASA (``registrar.masa_config``). A
``Table`` wraps one TOML table and its dotted path; every getter checks the type and range and
raises ``ConfigError("server.listen[1]: ...")``. ``Table.finish()`` refuses keys nobody asked
for, so a misspelt key is an error instead of a silently ignored setting. Relative paths are
resolved against the directory of the configuration file, so a config directory can be moved.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

T = TypeVar("T")
# Default meaning "the key must be present" (None is a legitimate default).
_REQUIRED: Any = object()
REQUIRED: Any = _REQUIRED
LOG_LEVELS = ("debug", "info", "warning", "error")
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the file or key and why."""


@dataclass(frozen=True)
class ListenAddress:
    """Where a server listens. ``host`` keeps an IPv6 zone (``fe80::1%eth0``): link-local
    listeners need it, and getaddrinfo resolves the interface name to a scope id."""

    host: str
    port: int

    @property
    def interface(self) -> str | None:
        return self.host.split("%", 1)[1] if "%" in self.host else None

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


_BRACKETED = re.compile(r"\[([^\]]+)\]:(\d{1,5})")
_PLAIN = re.compile(r"([^:\[\]]+):(\d{1,5})")


def parse_host_port(text: str) -> tuple[str, int]:
    """``[v6addr%zone]:port``, ``v4addr:port`` or ``name:port``; ValueError with the reason."""
    match = _BRACKETED.fullmatch(text)
    if match:
        host = match.group(1)
        addr, _, zone = host.partition("%")
        try:
            ipaddress.IPv6Address(addr)
        except ValueError as exc:
            raise ValueError(f"{addr!r} inside [] is not an IPv6 address") from exc
        if "%" in host and not zone:
            raise ValueError("empty interface name after %")
    else:
        match = _PLAIN.fullmatch(text)
        if not match:
            raise ValueError('expected "[ipv6]:port", "ipv4:port" or "name:port"')
        host = match.group(1)
    port = int(match.group(2))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not 1..65535")
    return host, port


class Table:
    """One TOML table being read; tracks which keys were used."""

    def __init__(self, data: dict[str, Any], path: str, base_dir: Path) -> None:
        self.data = data
        self.path = path
        self.base_dir = base_dir
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.key(name)}: {reason}")

    def has(self, name: str) -> bool:
        return name in self.data

    def _get(self, name: str, default: Any, kinds: tuple[type, ...], what: str) -> Any:
        self._used.add(name)
        if name not in self.data:
            if default is _REQUIRED:
                raise self.error(name, "missing (required)")
            return default
        value = self.data[name]
        # TOML booleans are Python bools, which are ints: never let one pass for a number.
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(name, f"must be {what}, not a boolean")
        if not isinstance(value, kinds):
            raise self.error(name, f"must be {what}, not {_toml_type(value)}")
        return value

    def string(self, name: str, default: Any = None, *, choices: tuple[str, ...] = ()) -> Any:
        value = self._get(name, default, (str,), "a string")
        if value is not None and choices and value not in choices:
            raise self.error(name, f"{value!r} is not one of {', '.join(choices)}")
        if value is not None and not choices and value == "":
            raise self.error(name, "must not be empty")
        return value

    def boolean(self, name: str, default: Any = None) -> Any:
        return self._get(name, default, (bool,), "true or false")

    def integer(self, name: str, default: Any = None, *, minimum: int | None = None,
                maximum: int | None = None) -> Any:
        value = self._get(name, default, (int,), "an integer")
        if value is not None:
            self._range(name, value, minimum, maximum)
        return value

    def number(self, name: str, default: Any = None, *, minimum: float | None = None,
               maximum: float | None = None) -> Any:
        value = self._get(name, default, (int, float), "a number")
        if value is not None:
            self._range(name, value, minimum, maximum)
            return float(value)
        return value

    def _range(self, name: str, value: float, lo: float | None, hi: float | None) -> None:
        if lo is not None and value < lo:
            raise self.error(name, f"{value} is below the minimum {lo}")
        if hi is not None and value > hi:
            raise self.error(name, f"{value} is above the maximum {hi}")

    def strings(self, name: str, default: Any = None) -> Any:
        value = self._get(name, default, (list,), "a list of strings")
        if value is None:
            return None
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise self.error(f"{name}[{i}]", "must be a non-empty string")
        return list(value)

    def each(self, name: str, values: list[str], parse: Callable[[str], T]) -> list[T]:
        """Apply ``parse`` to each item, naming the item on ValueError."""
        out = []
        for i, item in enumerate(values):
            try:
                out.append(parse(item))
            except ValueError as exc:
                raise self.error(f"{name}[{i}]", f"{item!r}: {exc}") from exc
        return out

    def listen(self, name: str, default: list[str] | None = None) -> list[ListenAddress]:
        values = self.strings(name, default if default is not None else _REQUIRED)
        if not values:
            raise self.error(name, "needs at least one address")
        return [ListenAddress(*hp) for hp in self.each(name, values, parse_host_port)]

    def file(self, name: str, default: Any = _REQUIRED) -> Any:
        """A path to an existing file (relative to the config file's directory)."""
        value = self.string(name, default)
        if value is None:
            return None
        path = self.resolve(value)
        if not path.is_file():
            raise self.error(name, f"{path}: no such file")
        return path

    def files(self, name: str, default: Any = _REQUIRED) -> list[Path]:
        values = self.strings(name, default)
        if values is None:
            return []
        paths = [self.resolve(v) for v in values]
        for i, path in enumerate(paths):
            if not path.is_file():
                raise self.error(f"{name}[{i}]", f"{path}: no such file")
        return paths

    def new_file(self, name: str, default: str) -> Path:
        """A path we may create: its directory must exist."""
        path = self.resolve(self.string(name, default))
        if not path.parent.is_dir():
            raise self.error(name, f"{path.parent}: directory does not exist")
        return path

    def resolve(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def table(self, name: str, *, required: bool = False) -> Table:
        value = self._get(name, _REQUIRED if required else {}, (dict,), "a table")
        return Table(value, self.key(name), self.base_dir)

    def tables(self, name: str) -> list[Table]:
        """An array of tables (``[[name]]``)."""
        value = self._get(name, [], (list,), "an array of tables")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.error(f"{name}[{i}]", "must be a table")
            out.append(Table(item, f"{self.key(name)}[{i}]", self.base_dir))
        return out

    def subtables(self) -> dict[str, Table]:
        """Every member of this table, each of which must be a table (a map keyed by name)."""
        out = {}
        for name, value in self.data.items():
            self._used.add(name)
            if not isinstance(value, dict):
                raise self.error(name, f"must be a table, not {_toml_type(value)}")
            out[name] = Table(value, self.key(f'"{name}"'), self.base_dir)
        return out

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self._used)
        if unknown:
            raise self.error(unknown[0], "unknown key (misspelt? see the module docstring)")


def _toml_type(value: object) -> str:
    return {
        str: "a string", int: "an integer", float: "a number", bool: "a boolean",
        list: "an array", dict: "a table",
    }.get(type(value), type(value).__name__)


def read_toml(path: Path) -> Table:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return Table(data, "", path.resolve().parent)


def log_level(table: Table) -> int:
    """The ``[log] level`` key (default "info") as a logging level."""
    log = table.table("log")
    level = log.string("level", "info", choices=LOG_LEVELS)
    log.finish()
    return int(getattr(logging, level.upper()))


# --- certificates and keys, loaded at configuration time so --check-config catches them ---


def load_certs(table: Table, name: str, path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise table.error(name, f"{path}: not a PEM certificate file ({exc})") from exc
    if not certs:
        raise table.error(name, f"{path}: holds no certificate")
    return certs


def load_key(table: Table, name: str, path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise table.error(name, f"{path}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
                      | ed25519.Ed25519PrivateKey):
        raise table.error(name, f"{path}: unsupported key type {type(key).__name__}")
    return key


def check_key_matches(table: Table, name: str, key: PrivateKey, cert: x509.Certificate) -> None:
    mine = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    theirs = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if mine != theirs:
        raise table.error(name, "private key does not belong to the certificate")


def require_ec(table: Table, name: str, key: PrivateKey, why: str) -> None:
    """CMS signing in brski.cms is ECDSA only (P-256/384/521)."""
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise table.error(name, f"must be an ECDSA key: {why} (CMS with ECDSA only)")
