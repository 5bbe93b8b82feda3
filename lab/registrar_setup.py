"""Configuration files for a MASA and a registrar, made from a ``brski-pki init`` directory.

For tests, the demo and the pledge simulator: they then run the services exactly as an
operator would::

    from lab.registrar_setup import write_configs
    registrar_toml, masa_toml = write_configs(
        pki, workdir,
        registrar_listen=["[fe80::b:2%eth0]:8443", "[fd4a:5044::100]:8443"],
        masa_listen=["[::1]:9443"], masa_address="[::1]:9443",
        announce_interfaces=["eth0"], grasp_period=1.0)
    masa = host.spawn([PY, "-m", "registrar.masa_cli", "--config", str(masa_toml)])
    registrar = host.spawn([PY, "-m", "registrar.cli", "--config", str(registrar_toml)])
    # or the console scripts: brski-masa --config ..., brski-registrar --config ...

Both services log ``ready: listening on ...`` (stderr) once every listener is bound; wait for
that line (``wait_ready``) before connecting.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from registrar.tomlconfig import parse_host_port

REGISTRAR_TOML = "registrar.toml"
MASA_TOML = "masa.toml"
READY_MARK = "ready: listening on"


def write_configs(
    pki_dir: Path | str,
    out_dir: Path | str,
    *,
    registrar_listen: Sequence[str] = ("[::]:8443",),
    masa_listen: Sequence[str] = ("[::1]:9443",),
    masa_address: str | None = None,
    announce_interfaces: Sequence[str] = (),
    announce_address: str | None = None,
    grasp_period: float = 60.0,
    mdns: bool = True,
    grasp: bool = True,
    ownership: str = "table",
    devices: Sequence[str] | None = None,
    enroll_serials: Sequence[str] | None = None,
    retry_after: int = 5,
    masa_timeout: float = 10.0,
    nonceless: bool = False,
    log_level: str = "info",
    ipip: Mapping[str, object] | None = None,
    coaps_listen: str | None = None,
    jpy_listen: str | None = None,
    store_url: str | None = None,
    masa_store_url: str | None = None,
) -> tuple[Path, Path]:
    """Write ``registrar.toml`` and ``masa.toml`` into ``out_dir``; return their paths.

    ``pki_dir``: a directory made by ``brski-pki init`` (manufacturer/, masa/, domain/,
    pki.json). Certificates and keys are used where they are, by absolute path.

    ``registrar_listen`` / ``masa_listen``: listen addresses, ``"[ipv6%iface]:port"``,
    ``"[ipv6]:port"`` or ``"ipv4:port"``.

    ``masa_address``: ``"host:port"`` where the registrar reaches the MASA. The IDevIDs name
    the MASA by the authority in pki.json (``masa_url``, e.g. ``masa.example:9443``); the
    registrar config maps that authority to this address, and still checks the MASA's TLS
    certificate against the authority's host name (``brski-pki`` puts ``masa.example``,
    localhost, ::1 and 127.0.0.1 in it unless ``--masa-name`` was given). Default: the first
    ``masa_listen`` address, with ``::``/``0.0.0.0`` replaced by loopback.

    ``announce_interfaces``: interfaces for the GRASP flood and mDNS (empty: none);
    ``announce_address`` the locator address (default: chosen per interface);
    ``grasp_period`` seconds between floods; ``mdns`` / ``grasp`` switch either off.

    ``ownership``: ``"table"`` lists ``devices`` (default: every IDevID under
    manufacturer/idevid/) as owned by the PKI's domain CA; ``"tofu"`` lets the first domain
    claim any device. ``enroll_serials``: registrar allowlist (None: every device of the
    manufacturer). ``retry_after``: Retry-After while the MASA is unreachable.
    ``nonceless``: the MASA accepts nonceless voucher-requests.

    ``ipip``: write an ``[ipip]`` table (``enabled = true`` unless given) with these keys, e.g.
    ``{"link_local": "fe80::b:2", "protocols": [41, 98], "proxies": ["fd4a:5044::1"]}``
    (keys in ``registrar.ipip_config``); it needs a ``[::]:port`` listen address.

    ``coaps_listen``: the registrar's CoAPS (cBRSKI, EST-coaps) UDP address, e.g.
    ``"[::1]:5684"`` (None: off). ``jpy_listen``: its JPY UDP address, where stateless join
    proxies send (``[jpy] listen``, e.g. ``"[::]:5685"``; None: off).

    ``store_url`` / ``masa_store_url``: a ``postgresql://`` database for the registrar's /
    the MASA's store (``[store] url``) instead of an SQLite file.

    Databases go to ``out_dir/registrar.db`` and ``out_dir/masa.db`` (unless a URL is given);
    the registrar's TLS chain (registrar certificate then domain CA) to
    ``out_dir/registrar-chain.pem``, the MASA's voucher-signing chain (signer then MASA CA)
    to ``out_dir/masa-signer-chain.pem``.
    """
    pki = Path(pki_dir).resolve()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        meta = json.loads((pki / "pki.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{pki}: not a PKI made by 'brski-pki init' ({exc})") from exc
    authority = masa_authority(str(meta["masa_url"]))
    if masa_address is None:
        host, port = parse_host_port(masa_listen[0])
        host = {"::": "::1", "0.0.0.0": "127.0.0.1"}.get(host, host)
        masa_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    parse_host_port(masa_address)  # ValueError now rather than a config error later
    for item in [*registrar_listen, *masa_listen]:
        parse_host_port(item)

    chain = out / "registrar-chain.pem"
    chain.write_bytes((pki / "domain/registrar.crt").read_bytes()
                      + (pki / "domain/ca.crt").read_bytes())
    # Vouchers carry the signer's chain up to the pledges' trust anchor (RFC 8366 §5.4).
    signer_chain = out / "masa-signer-chain.pem"
    signer_chain.write_bytes((pki / "masa/signer.crt").read_bytes()
                             + (pki / "masa/ca.crt").read_bytes())

    registrar = [
        "# written by lab.registrar_setup.write_configs",
        "[server]",
        f"listen = {_list(registrar_listen)}",
        f"cert = {_q(chain)}",
        f"key = {_q(pki / 'domain/registrar.key')}",
        "",
        "[pledges]",
        f"manufacturer_cas = {_list([str(pki / 'manufacturer/ca.crt')])}",
    ]
    if enroll_serials is not None:
        registrar += ['enroll = "allowlist"', f"serials = {_list(enroll_serials)}"]
    registrar += [
        "",
        "[domain_ca]",
        f"cert = {_q(pki / 'domain/ca.crt')}",
        f"key = {_q(pki / 'domain/ca.key')}",
        "",
        "[masa]",
        f"ca_certs = {_list([str(pki / 'masa/ca.crt')])}",
        f"timeout = {float(masa_timeout)}",
        f"retry_after = {int(retry_after)}",
        "",
        f"[masa.override.{_q(authority)}]",
        f"address = {_q(masa_address)}",
        "",
        "[store]",
        f"url = {_q(store_url)}" if store_url else f"path = {_q(out / 'registrar.db')}",
        "",
        "[announce]",
        f"interfaces = {_list(announce_interfaces)}",
        f"grasp = {_bool(grasp)}",
        f"grasp_period = {float(grasp_period)}",
        f"mdns = {_bool(mdns)}",
    ]
    if announce_address:
        registrar.append(f"address = {_q(announce_address)}")
    if ipip is not None:
        registrar += ["", "[ipip]", *(f"{key} = {_value(value)}"
                                      for key, value in {"enabled": True, **ipip}.items())]
    if coaps_listen is not None:
        parse_host_port(coaps_listen)
        registrar += ["", "[coaps]", f"listen = {_q(coaps_listen)}"]
    if jpy_listen is not None:
        parse_host_port(jpy_listen)
        registrar += ["", "[jpy]", f"listen = {_q(jpy_listen)}"]
    registrar += ["", "[log]", f"level = {_q(log_level)}", ""]

    if devices is None:
        devices = sorted(p.stem for p in (pki / "manufacturer/idevid").glob("*.crt"))
    masa = [
        "# written by lab.registrar_setup.write_configs",
        "[server]",
        f"listen = {_list(masa_listen)}",
        f"cert = {_q(pki / 'masa/tls.crt')}",
        f"key = {_q(pki / 'masa/tls.key')}",
        "",
        "[signer]",
        f"cert = {_q(signer_chain)}",
        f"key = {_q(pki / 'masa/signer.key')}",
        "",
        "[pledges]",
        f"manufacturer_cas = {_list([str(pki / 'manufacturer/ca.crt')])}",
        "",
        "[ownership]",
        f"mode = {_q(ownership)}",
        "[ownership.devices]",
        *(f"{_q(serial)} = {_q(pki / 'domain/ca.crt')}" for serial in devices),
        "",
        "[vouchers]",
        f"nonceless = {_bool(nonceless)}",
        "",
        "[store]",
        f"url = {_q(masa_store_url)}" if masa_store_url else f"path = {_q(out / 'masa.db')}",
        "",
        "[log]",
        f"level = {_q(log_level)}",
        "",
    ]
    registrar_toml, masa_toml = out / REGISTRAR_TOML, out / MASA_TOML
    registrar_toml.write_text("\n".join(registrar))
    masa_toml.write_text("\n".join(masa))
    return registrar_toml, masa_toml


def masa_authority(url: str) -> str:
    """The authority part of an IDevID MASA URL: ``masa.example:9443`` for both
    ``masa.example:9443`` and ``https://masa.example:9443/.well-known/brski``."""
    rest = url.split("://", 1)[1] if "://" in url else url
    return rest.split("/", 1)[0]


def wait_ready(log: Callable[[], str], timeout: float = 20.0, *,
               alive: Callable[[], bool] | None = None, count: int = 1) -> None:
    """Poll a log reader (e.g. ``LabProcess.log``) until the service says it is ready
    (``count`` ready lines, for a log appended to across restarts). ``alive`` (e.g.
    ``LabProcess.alive``) makes a service that exits early fail at once, with its log."""
    deadline = time.monotonic() + timeout
    while log().count(READY_MARK) < count:
        if alive is not None and not alive():
            raise RuntimeError(f"service exited before it was ready; log:\n{log()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"service not ready after {timeout} s; log:\n{log()[-3000:]}")
        time.sleep(0.05)


def _q(value: object) -> str:
    # A JSON string is a valid TOML basic string (same escapes).
    return json.dumps(str(value))


def _list(values: Sequence[object]) -> str:
    return "[" + ", ".join(_q(v) for v in values) + "]"


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _value(value: object) -> str:
    """A TOML value for a bool, number, string or list of those."""
    if isinstance(value, bool):
        return _bool(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return _q(value)
