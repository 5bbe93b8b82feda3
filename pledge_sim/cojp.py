"""A CoJP pledge (RFC 9031 §8.1): one Join Request over OSCORE with a PSK, the Configuration back.

The pledge's OSCORE context is aiocoap's FilesystemSecurityContext in a directory per pledge
(``secret``, empty Sender ID, Recipient ID "JRC", ID context = pledge ID): it persists the
sender sequence number between runs (RFC 8613 App. B.1.1), as RFC 9031 §7.3.1 requires of a
pledge. Direct to the JRC, or through a join proxy: then the outer request carries
Proxy-Scheme "coap" and Uri-Host "6tisch.arpa" (§8.1), added after protection because aiocoap
drops a bare Proxy-Scheme (protocols.md §9.2); OSCORE has no Class I options, so the proxy may
strip them. This is what ``pledge-sim --cojp`` will drive.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path

import aiocoap
from aiocoap import oscore
from aiocoap.message import UndecidedRemote
from aiocoap.numbers.codes import Code

from brski import cojp, edhoc_oscore
from brski.errors import DecodeError, ProtocolError, ValidationError
from coaps_io.oscore_ephemeral import EphemeralOscoreContext

JRC_ID = b"JRC"
JOIN_TIMEOUT = 30.0


class JoinFailed(Exception):
    """The join did not end with a valid Configuration; the text says why."""


@dataclass(frozen=True)
class JoinResult:
    configuration: cojp.Configuration
    request_piv: bytes  # the pledge's Partial IV of the Join Request
    response_piv: bytes | None  # the JRC's own Partial IV, if it sent one


def write_context(directory: Path, pledge_id: bytes, psk: bytes) -> None:
    """The pledge's OSCORE context files (aiocoap's format); sequence.json is left alone, so
    a pledge that joined before keeps counting from where it was."""
    directory.mkdir(parents=True, exist_ok=True)
    settings = {"sender-id_hex": "", "recipient-id_hex": JRC_ID.hex(),
                "id-context_hex": pledge_id.hex(), "algorithm": "AES-CCM-16-64-128"}
    (directory / "settings.json").write_text(json.dumps(settings))
    secret = directory / "secret.json"
    secret.write_text(json.dumps({"secret_hex": psk.hex()}))
    secret.chmod(0o600)


def load_context(directory: Path) -> oscore.FilesystemSecurityContext:
    return oscore.FilesystemSecurityContext(str(directory))


def response_partial_iv(message: aiocoap.Message) -> bytes | None:
    """The Partial IV in a response's OSCORE option (None: the request's nonce was reused)."""
    _, _, unprotected, _ = oscore.CanUnprotect._extract_encrypted0(message)
    return unprotected.get(oscore.COSE_PIV)


async def _post(client: aiocoap.Context, target: str, path: tuple[str, ...], payload: bytes,
                via_proxy: bool, timeout: float) -> aiocoap.Message:
    request = aiocoap.Message(code=Code.POST, uri_path=path, payload=payload)
    request.mtype = aiocoap.CON
    request.remote = UndecidedRemote("coap", target)
    if via_proxy:
        request.opt.proxy_scheme = "coap"
        request.opt.uri_host = "6tisch.arpa"
    try:
        return await asyncio.wait_for(client.request(request).response, timeout)
    except (TimeoutError, aiocoap.error.Error) as exc:
        raise JoinFailed(f"no response from {target}: {exc or type(exc).__name__}") from None


async def edhoc_context(client: aiocoap.Context, target: str, private_key: bytes,
                        credential: bytes, jrc_credential: bytes, *, via_proxy: bool = False,
                        timeout: float = JOIN_TIMEOUT) -> EphemeralOscoreContext:
    """EDHOC (method 3, suite 2, forward flow) with the JRC; the OSCORE context it yields
    (pledge Sender ID C_R, Recipient ID C_I, no ID context: RFC 9528 App. A.1)."""
    import lakers  # only pledges that use EDHOC need it

    initiator = lakers.EdhocInitiator()
    c_i = edhoc_oscore.connection_id(os.urandom(2))
    path = (".well-known", "edhoc")
    try:
        message_1 = initiator.prepare_message_1(c_i=c_i)
    except (ValueError, RuntimeError) as exc:
        raise JoinFailed(f"EDHOC message_1: {exc}") from None
    answer = await _post(client, target, path, edhoc_oscore.MESSAGE_1_PREFIX + message_1,
                         via_proxy, timeout)
    if answer.code != Code.CHANGED:
        raise JoinFailed(f"EDHOC message_1 answered {answer.code} {answer.payload[:64]!r}")
    jrc = lakers.Credential(jrc_credential)
    try:
        c_r, id_cred_r, _ead_2 = initiator.parse_message_2(answer.payload)
        if edhoc_oscore.kid_of_id_cred(bytes(id_cred_r)) != bytes(jrc.kid()):
            raise JoinFailed("EDHOC message_2 names another JRC credential")
        initiator.verify_message_2(private_key, lakers.Credential(credential), jrc)
        message_3, _prk_out = initiator.prepare_message_3(lakers.CredentialTransfer.ByReference)
    except (ValueError, RuntimeError, ProtocolError) as exc:
        raise JoinFailed(f"EDHOC message_2: {exc}") from None
    answer = await _post(client, target, path, bytes(c_r) + message_3, via_proxy, timeout)
    if answer.code != Code.CHANGED:
        raise JoinFailed(f"EDHOC message_3 answered {answer.code} {answer.payload[:64]!r}")
    initiator.completed_without_message_4()
    secret = initiator.edhoc_exporter(edhoc_oscore.MASTER_SECRET_LABEL, b"",
                                      edhoc_oscore.MASTER_SECRET_LENGTH)
    salt = initiator.edhoc_exporter(edhoc_oscore.MASTER_SALT_LABEL, b"",
                                    edhoc_oscore.MASTER_SALT_LENGTH)
    return EphemeralOscoreContext(edhoc_oscore.oscore_id(bytes(c_r)),
                                  edhoc_oscore.oscore_id(c_i), bytes(secret), bytes(salt))


async def join(client: aiocoap.Context, context: oscore.CanProtect,
               target: str, network_id: bytes, *, via_proxy: bool = False,
               role: int | None = None, timeout: float = JOIN_TIMEOUT) -> JoinResult:
    """POST /j to ``target`` ("[addr]:port", the JRC or a join proxy) and check the answer."""
    inner = aiocoap.Message(code=Code.POST, uri_path=("j",),
                            payload=cojp.JoinRequest(network_id, role=role).encode())
    outer, request_id = context.protect(inner)
    outer.mtype = aiocoap.CON
    outer.remote = UndecidedRemote("coap", target)
    if via_proxy:
        outer.opt.proxy_scheme = "coap"
        outer.opt.uri_host = "6tisch.arpa"
    try:
        response = await asyncio.wait_for(client.request(outer).response, timeout)
    except (TimeoutError, aiocoap.error.Error) as exc:
        raise JoinFailed(f"no response from {target}: {exc or type(exc).__name__}") from None
    if response.opt.oscore is None:
        # §7.3.2: a pledge discards any response that is not OSCORE-protected.
        raise JoinFailed(f"unprotected {response.code} from {target} (discarded)")
    try:
        plain, _ = context.unprotect(response, request_id)
    except oscore.ProtectionInvalid as exc:
        raise JoinFailed(f"response from {target} does not verify: {exc}") from None
    if plain.code != Code.CHANGED:
        detail = ""
        if plain.code == Code.BAD_REQUEST and plain.payload:
            try:
                detail = f": {cojp.decode_unsupported_configuration(plain.payload)}"
            except ValidationError as exc:
                detail = f" (unreadable diagnostic: {exc})"
        raise JoinFailed(f"JRC answered {plain.code}{detail}")
    try:
        configuration = cojp.decode_configuration(plain.payload)
    except (ValidationError, DecodeError) as exc:
        raise JoinFailed(f"Configuration refused: {exc}") from None
    return JoinResult(configuration, request_id.partial_iv, response_partial_iv(response))


# -- a fleet: what `pledge-sim cojp` runs ------------------------------------------------------

@dataclass(frozen=True)
class PledgeOutcome:
    pledge_id: bytes
    seconds: float
    result: JoinResult | None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.result is not None

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"pledge_id": self.pledge_id.hex(), "ok": self.ok,
                                  "seconds": round(self.seconds, 3)}
        if self.result is not None:
            conf = self.result.configuration
            doc["short_id"] = conf.short_identifier.identifier.hex() \
                if conf.short_identifier else None
            doc["keys"] = len(conf.link_layer_keys or ())
            doc["request_piv"] = self.result.request_piv.hex()
            doc["response_piv"] = None if self.result.response_piv is None \
                else self.result.response_piv.hex()
        else:
            doc["reason"] = self.reason
        return doc


def read_pledges(path: Path) -> list[tuple[bytes, bytes | None]]:
    """``PLEDGE_ID PSK`` or ``PLEDGE_ID edhoc`` per line (hex; ``-``/``:`` allowed in the ID;
    ``#`` comments): None for the PSK of an EDHOC pledge. ValueError names the line."""
    pledges: list[tuple[bytes, bytes | None]] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected 'PLEDGE_ID PSK' or 'PLEDGE_ID edhoc'")
            pledge_id = bytes.fromhex(parts[0].replace("-", "").replace(":", ""))
            psk = None if parts[1] == "edhoc" else bytes.fromhex(parts[1])
            if not pledge_id or (psk is not None and len(psk) < 16):
                raise ValueError("empty pledge ID or a PSK under 16 bytes")
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
        pledges.append((pledge_id, psk))
    return pledges


@dataclass(frozen=True)
class EdhocKeys:
    """Where EDHOC pledges find their keys: ``directory/<pledge ID hex>.key`` and ``.ccs``
    (as ``brski-registrar cojp make-edhoc-credential`` writes them), and the JRC's CCS."""

    directory: Path
    jrc_credential: bytes

    def of(self, pledge_id: bytes) -> tuple[bytes, bytes]:
        base = self.directory / pledge_id.hex()
        return (bytes.fromhex(base.with_suffix(".key").read_text()),
                bytes.fromhex(base.with_suffix(".ccs").read_text()))


async def join_all(pledges: list[tuple[bytes, bytes | None]], state: Path, target: str,
                   network_id: bytes, *, via_proxy: bool, concurrency: int,
                   timeout: float, edhoc: EdhocKeys | None = None) -> list[PledgeOutcome]:
    """Join each pledge once, at most ``concurrency`` at a time. A PSK pledge's OSCORE context
    lives in ``state/<pledge ID>`` (made from the PSK on first use, then kept: its sequence
    number carries on across runs); an EDHOC pledge (PSK None) runs EDHOC first."""
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    gate = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()

    async def with_edhoc(pledge_id: bytes) -> JoinResult:
        if edhoc is None:
            raise JoinFailed("an EDHOC pledge, but no JRC credential given")
        try:
            private_key, credential = edhoc.of(pledge_id)
        except (OSError, ValueError) as exc:
            raise JoinFailed(f"EDHOC keys of {pledge_id.hex()}: {exc}") from None
        context = await edhoc_context(client, target, private_key, credential,
                                      edhoc.jrc_credential, via_proxy=via_proxy,
                                      timeout=timeout)
        return await join(client, context, target, network_id, via_proxy=via_proxy,
                          timeout=timeout)

    async def one(pledge_id: bytes, psk: bytes | None) -> PledgeOutcome:
        async with gate:
            started = loop.time()
            directory = state / pledge_id.hex()
            context = None
            try:
                if psk is None:
                    result = await with_edhoc(pledge_id)
                else:
                    if not (directory / "secret.json").exists():
                        write_context(directory, pledge_id, psk)
                    context = load_context(directory)
                    result = await join(client, context, target, network_id,
                                        via_proxy=via_proxy, timeout=timeout)
            except JoinFailed as exc:
                return PledgeOutcome(pledge_id, loop.time() - started, None, str(exc))
            except (OSError, ValueError, oscore.ContextUnavailable) as exc:
                return PledgeOutcome(pledge_id, loop.time() - started, None,
                                     f"OSCORE context in {directory}: {exc}")
            finally:
                if context is not None:
                    # Write the sequence number back and free the context's lock now, not at
                    # garbage collection: a second run in this process loads it again.
                    context._destroy()
            return PledgeOutcome(pledge_id, loop.time() - started, result)

    try:
        return list(await asyncio.gather(*(one(i, k) for i, k in pledges)))
    finally:
        await client.shutdown()


def report(outcomes: list[PledgeOutcome], elapsed: float) -> str:
    lines = [f"{'pledge':<18} {'short-id':<8} {'seconds':>7}  result"]
    for o in outcomes:
        sid = o.result.configuration.short_identifier if o.result else None
        lines.append(f"{o.pledge_id.hex():<18} {sid.identifier.hex() if sid else '-':<8} "
                     f"{o.seconds:7.2f}  {'ok' if o.ok else 'FAILED: ' + o.reason}")
    ok = sum(o.ok for o in outcomes)
    rate = ok / elapsed if elapsed > 0 else 0.0
    lines.append(f"{ok} joined, {len(outcomes) - ok} failed in {elapsed:.2f} s "
                 f"({rate:.1f} joins/s)")
    return "\n".join(lines)
