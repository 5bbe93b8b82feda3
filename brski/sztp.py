"""Secure Zero Touch Provisioning (RFC 8572) wire formats, sans-IO.

    ci = OnboardingInformation(configuration_handling="merge", configuration=b"...")
    data = encode_conveyed(ci, "json")                        # the YANG data, JSON or XML
    der = wrap_unsigned(data, "json")                         # ContentInfo, SZTP type
    der = sign_conveyed(data, "json", owner_key, owner_chain, now)   # SignedData around it
    got = unwrap_conveyed(der)                                # Conveyed(encoding, data, signed)
    ci = decode_conveyed(got.data, got.encoding)              # strict: unknown leaves refused

    body = GetBootstrappingDataInput(hw_model="m", nonce=n).encode("json")
    req = GetBootstrappingDataInput.decode(body, "json")      # DecodeError/ValidationError
    out = GetBootstrappingDataOutput(conveyed_information=der, ...).encode("xml")
    ReportProgressInput("bootstrap-complete", "done").encode("json")
    errors_body(status_tag, message, "json")                  # ietf-restconf:errors

The YANG modules are ietf-sztp-conveyed-info and ietf-sztp-bootstrap-server (RFC 8572 §6.3,
§7.3); their rules are applied here by hand (see protocols.md §8): mandatory choice, leaf
types, `must`/`when` constraints, nonce length 16..32, port range, sha-256 hash length.
Every decoder raises DecodeError (not the encoding it claims) or ValidationError (well-formed,
breaks a YANG rule), with the offending leaf named. XML input with a DOCTYPE is refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from asn1crypto import cms as acms
from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import cms
from .chain import load_certificate
from .errors import DecodeError, UsageError, ValidationError

CONVEYED_XML = "1.2.840.113549.1.9.16.1.42"  # id-ct-sztpConveyedInfoXML (RFC 8572 §3.1)
CONVEYED_JSON = "1.2.840.113549.1.9.16.1.43"  # id-ct-sztpConveyedInfoJSON
SIGNED_DATA = "1.2.840.113549.1.7.2"
CONVEYED_TYPES = frozenset({CONVEYED_XML, CONVEYED_JSON})
NS_INFO = "urn:ietf:params:xml:ns:yang:ietf-sztp-conveyed-info"
NS_SERVER = "urn:ietf:params:xml:ns:yang:ietf-sztp-bootstrap-server"
NS_RESTCONF = "urn:ietf:params:xml:ns:yang:ietf-restconf"
MOD_INFO = "ietf-sztp-conveyed-info"
MOD_SERVER = "ietf-sztp-bootstrap-server"
MEDIA = {"json": "application/yang-data+json", "xml": "application/yang-data+xml"}
OPERATIONS = "/restconf/operations/ietf-sztp-bootstrap-server:"
MAX_BODY = 256 * 1024
MAX_REDIRECT_DEPTH = 10  # RFC 8572 §2.1: SHOULD be at most 10
DHCPV6_OPTION = 136  # OPTION_V6_SZTP_REDIRECT (RFC 8572 §8.3)
CALL_HOME_RESTCONF_TLS = 4336  # RFC 8071 §6
PROGRESS_TYPES = (
    "bootstrap-initiated",
    "parsing-initiated", "parsing-warning", "parsing-error", "parsing-complete",
    "boot-image-initiated", "boot-image-warning", "boot-image-error", "boot-image-mismatch",
    "boot-image-installed-rebooting", "boot-image-complete",
    "pre-script-initiated", "pre-script-warning", "pre-script-error", "pre-script-complete",
    "config-initiated", "config-warning", "config-error", "config-complete",
    "post-script-initiated", "post-script-warning", "post-script-error", "post-script-complete",
    "bootstrap-warning", "bootstrap-error", "bootstrap-complete", "informational",
)
TERMINAL_PROGRESS = frozenset({"bootstrap-complete", "boot-image-installed-rebooting",
                               "bootstrap-error", "parsing-error", "boot-image-error",
                               "pre-script-error", "config-error", "post-script-error"})
_HEX = re.compile(r"^([0-9a-fA-F]{2}(:[0-9a-fA-F]{2})*)?$")


def encoding_of(media: str | None) -> str:
    """'json' or 'xml' for a RESTCONF media type (parameters ignored); DecodeError else."""
    base = (media or "").split(";")[0].strip().lower()
    for name, value in MEDIA.items():
        if base == value:
            return name
    raise DecodeError(f"media type {base or '(none)'!r} is not application/yang-data+json "
                      "or +xml")


# --- small typed readers --------------------------------------------------------------------


def _b64(name: str, text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValidationError(f"{name}: binary must be a base64 string")
    try:
        return base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError(f"{name}: not valid base64") from None


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{name}: must be a string, got {type(value).__name__}")
    return value


def _keys(name: str, obj: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValidationError(f"{name}: must be an object")
    extra = sorted(set(obj) - allowed)
    if extra:
        raise ValidationError(f"{name}: unknown node {extra[0]!r}")
    return obj


def _empty(name: str, value: Any) -> None:
    # RFC 7951 §6.9: an empty leaf is [null] in JSON
    if value != [None]:
        raise ValidationError(f"{name}: an empty leaf is [null]")


def _json(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_BODY:
        raise DecodeError(f"{what} larger than {MAX_BODY} bytes")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecodeError(f"{what} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or len(doc) != 1:
        raise DecodeError(f"{what}: a JSON object with exactly one top-level member is required")
    return doc


def _xml(data: bytes, what: str) -> ET.Element:
    if len(data) > MAX_BODY:
        raise DecodeError(f"{what} larger than {MAX_BODY} bytes")
    if b"<!DOCTYPE" in data.upper() or b"<!ENTITY" in data.upper():
        raise DecodeError(f"{what}: XML with a DOCTYPE or entities is refused")
    try:
        return ET.fromstring(data)
    except (ET.ParseError, LookupError, ValueError) as exc:  # LookupError: unknown encoding
        raise DecodeError(f"{what} is not XML: {exc}") from None


def _local(elem: ET.Element, ns: str, what: str) -> str:
    tag = elem.tag
    if not tag.startswith("{" + ns + "}"):
        raise ValidationError(f"{what}: element {tag!r} is not in namespace {ns}")
    return tag[len(ns) + 2:]


def _xml_tree(elem: ET.Element, ns: str, lists: set[str], what: str) -> dict[str, Any]:
    """XML children as the JSON shape (lists for YANG lists/leaf-lists, [None] for empty)."""
    out: dict[str, Any] = {}
    for child in elem:
        name = _local(child, ns, what)
        if len(child):
            value: Any = _xml_tree(child, ns, lists, f"{what}/{name}")
        elif child.text is None or not child.text.strip():
            value = [None]
        else:
            value = child.text.strip()
        if name in lists:
            out.setdefault(name, []).append(value)
        elif name in out:
            raise ValidationError(f"{what}: {name} appears twice")
        else:
            out[name] = value
    return out


def _xml_build(parent: ET.Element, ns: str, obj: dict[str, Any]) -> None:
    for name, value in obj.items():
        for item in value if isinstance(value, list) and value != [None] else [value]:
            child = ET.SubElement(parent, f"{{{ns}}}{name}")
            if isinstance(item, dict):
                _xml_build(child, ns, item)
            elif item != [None] and item is not None:
                child.text = str(item)


def _xml_bytes(root: ET.Element, ns: str) -> bytes:
    ET.register_namespace("", ns)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


# --- conveyed information (RFC 8572 §6.3) ---------------------------------------------------


@dataclass(frozen=True)
class BootstrapServer:
    address: str
    port: int = 443
    trust_anchor: bytes | None = None  # cms: degenerate SignedData with the TA chain

    def tree(self) -> dict[str, Any]:
        out: dict[str, Any] = {"address": self.address, "port": self.port}
        if self.trust_anchor is not None:
            out["trust-anchor"] = base64.b64encode(self.trust_anchor).decode()
        return out

    @classmethod
    def from_tree(cls, obj: Any) -> BootstrapServer:
        obj = _keys("bootstrap-server", obj, {"address", "port", "trust-anchor"})
        if "address" not in obj:
            raise ValidationError("bootstrap-server: address is mandatory")
        address = _text("bootstrap-server/address", obj["address"])
        if not address or len(address) > 253 or any(c in address for c in " /?#@"):
            raise ValidationError(f"bootstrap-server/address: {address!r} is not an inet:host")
        port = obj.get("port", 443)
        try:
            port = int(port)
        except (TypeError, ValueError):
            raise ValidationError(f"bootstrap-server/port: {port!r} is not a port") from None
        if not 0 <= port <= 65535:
            raise ValidationError(f"bootstrap-server/port: {port} out of range")
        ta = _b64("bootstrap-server/trust-anchor", obj["trust-anchor"]) \
            if "trust-anchor" in obj else None
        return cls(address, port, ta)


@dataclass(frozen=True)
class RedirectInformation:
    servers: tuple[BootstrapServer, ...]
    TOP: ClassVar[str] = "redirect-information"

    def tree(self) -> dict[str, Any]:
        if not self.servers:
            raise UsageError("redirect-information needs at least one bootstrap-server")
        return {"bootstrap-server": [s.tree() for s in self.servers]}

    @classmethod
    def from_tree(cls, obj: Any) -> RedirectInformation:
        obj = _keys("redirect-information", obj, {"bootstrap-server"})
        servers = obj.get("bootstrap-server")
        if not isinstance(servers, list) or not servers:
            raise ValidationError("redirect-information: at least one bootstrap-server "
                                  "(min-elements 1)")
        parsed = tuple(BootstrapServer.from_tree(s) for s in servers)
        if len({s.address for s in parsed}) != len(parsed):
            raise ValidationError("redirect-information: bootstrap-server address (the list "
                                  "key) repeated")
        return cls(parsed)


@dataclass(frozen=True)
class BootImage:
    os_name: str | None = None
    os_version: str | None = None
    download_uris: tuple[str, ...] = ()
    sha256: bytes | None = None  # image-verification, hash-algorithm sztp-info:sha-256

    def tree(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.os_name is not None:
            out["os-name"] = self.os_name
        if self.os_version is not None:
            out["os-version"] = self.os_version
        if self.download_uris:
            out["download-uri"] = list(self.download_uris)
        if self.sha256 is not None:
            out["image-verification"] = [{"hash-algorithm": f"{MOD_INFO}:sha-256",
                                          "hash-value": self.sha256.hex(":")}]
        return out

    @classmethod
    def from_tree(cls, obj: Any) -> BootImage:
        obj = _keys("boot-image", obj, {"os-name", "os-version", "download-uri",
                                        "image-verification"})
        uris = obj.get("download-uri", [])
        if isinstance(uris, str):
            uris = [uris]
        if not isinstance(uris, list):
            raise ValidationError("boot-image/download-uri: must be a leaf-list")
        sha = None
        for entry in obj.get("image-verification", []) if isinstance(
                obj.get("image-verification", []), list) else [obj["image-verification"]]:
            entry = _keys("image-verification", entry, {"hash-algorithm", "hash-value"})
            algorithm = _text("image-verification/hash-algorithm",
                              entry.get("hash-algorithm"))
            if algorithm.split(":")[-1] != "sha-256":
                raise ValidationError(f"image-verification/hash-algorithm: {algorithm!r} is "
                                      "not sztp-info:sha-256, the only identity defined")
            value = _text("image-verification/hash-value", entry.get("hash-value"))
            if not _HEX.match(value) or len(value.replace(":", "")) != 64:
                raise ValidationError("image-verification/hash-value: not a 32-byte "
                                      "yang:hex-string")
            sha = bytes.fromhex(value.replace(":", ""))
        return cls(
            os_name=_text("boot-image/os-name", obj["os-name"]) if "os-name" in obj else None,
            os_version=_text("boot-image/os-version", obj["os-version"])
            if "os-version" in obj else None,
            download_uris=tuple(_text("boot-image/download-uri", u) for u in uris),
            sha256=sha,
        )


@dataclass(frozen=True)
class OnboardingInformation:
    boot_image: BootImage | None = None
    configuration_handling: str | None = None  # "merge" | "replace"
    pre_configuration_script: bytes | None = None
    configuration: bytes | None = None
    post_configuration_script: bytes | None = None
    TOP: ClassVar[str] = "onboarding-information"

    def tree(self) -> dict[str, Any]:
        self.check()
        out: dict[str, Any] = {}
        if self.boot_image is not None:
            out["boot-image"] = self.boot_image.tree()
        if self.configuration_handling is not None:
            out["configuration-handling"] = self.configuration_handling
        for name, value in (("pre-configuration-script", self.pre_configuration_script),
                            ("configuration", self.configuration),
                            ("post-configuration-script", self.post_configuration_script)):
            if value is not None:
                out[name] = base64.b64encode(value).decode()
        return out

    def check(self) -> None:
        if self.configuration_handling not in (None, "merge", "replace"):
            raise ValidationError(f"configuration-handling: {self.configuration_handling!r} "
                                  "is not merge or replace")
        if (self.configuration_handling is None) != (self.configuration is None):
            raise ValidationError("configuration and configuration-handling must come "
                                  "together (RFC 8572 §6.3 'must')")

    @classmethod
    def from_tree(cls, obj: Any) -> OnboardingInformation:
        obj = _keys("onboarding-information", obj, {
            "boot-image", "configuration-handling", "pre-configuration-script",
            "configuration", "post-configuration-script"})
        out = cls(
            boot_image=BootImage.from_tree(obj["boot-image"]) if "boot-image" in obj else None,
            configuration_handling=_text("configuration-handling",
                                         obj["configuration-handling"])
            if "configuration-handling" in obj else None,
            pre_configuration_script=_b64("pre-configuration-script",
                                          obj["pre-configuration-script"])
            if "pre-configuration-script" in obj else None,
            configuration=_b64("configuration", obj["configuration"])
            if "configuration" in obj else None,
            post_configuration_script=_b64("post-configuration-script",
                                           obj["post-configuration-script"])
            if "post-configuration-script" in obj else None,
        )
        out.check()
        return out


ConveyedInformation = RedirectInformation | OnboardingInformation
_CONVEYED = {RedirectInformation.TOP: RedirectInformation,
             OnboardingInformation.TOP: OnboardingInformation}
_XML_LISTS = {"bootstrap-server", "download-uri", "image-verification"}


def encode_conveyed(ci: ConveyedInformation, encoding: str) -> bytes:
    if encoding == "json":
        return json.dumps({f"{MOD_INFO}:{ci.TOP}": ci.tree()}, indent=1).encode()
    if encoding == "xml":
        root = ET.Element(f"{{{NS_INFO}}}{ci.TOP}")
        tree = ci.tree()
        for check in tree.get("boot-image", {}).get("image-verification", []):
            # RFC 7950 §9.10.3: unprefixed, an identityref is in the default namespace,
            # which is this module's (a JSON module-name prefix means nothing in XML)
            check["hash-algorithm"] = "sha-256"
        _xml_build(root, NS_INFO, tree)
        return _xml_bytes(root, NS_INFO)
    raise UsageError(f"encoding {encoding!r}: json or xml")


def decode_conveyed(data: bytes, encoding: str) -> ConveyedInformation:
    """The yang-data conveyed-information: exactly one of the two choices."""
    if encoding == "json":
        ((top, body),) = _json(data, "conveyed-information").items()
        module, _, name = top.partition(":")
        if module != MOD_INFO or name not in _CONVEYED:
            raise ValidationError(f"conveyed-information: top-level {top!r} is neither "
                                  f"{MOD_INFO}:redirect-information nor :onboarding-information")
        return _CONVEYED[name].from_tree(body)
    if encoding == "xml":
        root = _xml(data, "conveyed-information")
        name = _local(root, NS_INFO, "conveyed-information")
        if name not in _CONVEYED:
            raise ValidationError(f"conveyed-information: top-level {name!r} is neither "
                                  "redirect-information nor onboarding-information")
        return _CONVEYED[name].from_tree(_xml_tree(root, NS_INFO, _XML_LISTS, name))
    raise UsageError(f"encoding {encoding!r}: json or xml")


# --- CMS: conveyed information, owner certificate (RFC 8572 §3) -----------------------------


class _ContentInfo(core.Sequence):
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("content_type", core.ObjectIdentifier),
        ("content", core.Any, {"explicit": 0}),
    ]


class _UnsignedConveyed(core.Sequence):
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("content_type", core.ObjectIdentifier),
        ("content", core.OctetString, {"explicit": 0}),
    ]


def _type_oid(encoding: str) -> str:
    if encoding not in ("json", "xml"):
        raise UsageError(f"encoding {encoding!r}: json or xml")
    return CONVEYED_JSON if encoding == "json" else CONVEYED_XML


def wrap_unsigned(data: bytes, encoding: str) -> bytes:
    """ContentInfo { id-ct-sztpConveyedInfo{JSON,XML}, OCTET STRING data } (§3.1, unsigned)."""
    return _UnsignedConveyed({"content_type": _type_oid(encoding), "content": data}).dump()


def sign_conveyed(data: bytes, encoding: str, key: cms.SigningKey,
                  certs: Sequence[x509.Certificate], now: datetime) -> bytes:
    """SignedData over the conveyed information, eContentType the SZTP one (§3.1)."""
    return cms.sign(data, key, certs, now, econtent_type=_type_oid(encoding),
                    content_types=CONVEYED_TYPES)


@dataclass(frozen=True)
class Conveyed:
    encoding: str  # json | xml
    data: bytes
    signed: cms.SignedData | None  # None: an unsigned ContentInfo


def unwrap_conveyed(der: bytes) -> Conveyed:
    """Either form of §3.1 (envelopedData is not supported: DecodeError). Verifies nothing."""
    if not isinstance(der, bytes) or len(der) > MAX_BODY:
        raise DecodeError("conveyed-information: CMS missing or too large")
    try:
        info = _ContentInfo.load(der, strict=True)
        oid = info["content_type"].dotted
    except Exception as exc:  # asn1crypto raises assorted types on bad DER
        raise DecodeError(f"conveyed-information is not a CMS ContentInfo: {exc}") from None
    if oid == SIGNED_DATA:
        signed = cms.parse(der, content_types=CONVEYED_TYPES)
        return Conveyed("json" if signed.econtent_type == CONVEYED_JSON else "xml",
                        signed.content, signed)
    if oid not in CONVEYED_TYPES:
        raise DecodeError(f"conveyed-information CMS type {oid} is not signedData nor an "
                          "SZTP conveyed-information type")
    try:
        data = info["content"].parse(core.OctetString).native
    except Exception as exc:
        raise DecodeError(f"conveyed-information content is not an OCTET STRING: {exc}") \
            from None
    return Conveyed("json" if oid == CONVEYED_JSON else "xml", data, None)


def degenerate_certs(certs: Sequence[x509.Certificate]) -> bytes:
    """A certs-only SignedData (no signers, id-data): the owner-certificate and trust-anchor
    artifacts of RFC 8572 §3.2 and §6.3."""
    if not certs:
        raise UsageError("a degenerate SignedData needs at least one certificate")
    sd = acms.SignedData({
        "version": "v1",
        "digest_algorithms": [],
        "encap_content_info": {"content_type": "data"},
        "certificates": [acms.CertificateChoices.load(c.public_bytes(serialization.Encoding.DER))
                         for c in certs],
        "signer_infos": [],
    })
    return acms.ContentInfo({"content_type": "signed_data", "content": sd}).dump()


def parse_degenerate(der: bytes, what: str) -> list[x509.Certificate]:
    if not isinstance(der, bytes) or len(der) > MAX_BODY:
        raise DecodeError(f"{what}: CMS missing or too large")
    try:
        info = acms.ContentInfo.load(der, strict=True)
        if info["content_type"].dotted != SIGNED_DATA:
            raise DecodeError(f"{what}: CMS is {info['content_type'].dotted}, not signedData")
        choices = list(info["content"]["certificates"] or ())
        ders = [c.chosen.dump() for c in choices if c.name == "certificate"]
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"{what}: not a CMS SignedData: {exc}") from None
    if not ders:
        raise DecodeError(f"{what}: the CMS carries no certificate")
    return [load_certificate(d, f"a {what} certificate") for d in ders]


# --- RESTCONF RPCs (RFC 8572 §7.3) ----------------------------------------------------------


def _rpc_doc(data: bytes, encoding: str, wrapper: str, what: str) -> dict[str, Any]:
    """The body of an RPC input/output as a JSON-shaped dict."""
    if encoding == "json":
        ((top, body),) = _json(data, what).items()
        if top != f"{MOD_SERVER}:{wrapper}":
            raise ValidationError(f"{what}: top-level member must be "
                                  f"\"{MOD_SERVER}:{wrapper}\", not {top!r}")
        if not isinstance(body, dict):
            raise ValidationError(f"{what}: {wrapper} must be an object")
        return body
    if encoding == "xml":
        root = _xml(data, what)
        if _local(root, NS_SERVER, what) != wrapper:
            raise ValidationError(f"{what}: root element must be {wrapper}")
        return _xml_tree(root, NS_SERVER, {"ssh-host-key", "trust-anchor-cert"}, what)
    raise UsageError(f"encoding {encoding!r}: json or xml")


def _rpc_bytes(obj: dict[str, Any], encoding: str, wrapper: str) -> bytes:
    if encoding == "json":
        return json.dumps({f"{MOD_SERVER}:{wrapper}": obj}).encode()
    root = ET.Element(f"{{{NS_SERVER}}}{wrapper}")
    _xml_build(root, NS_SERVER, obj)
    return _xml_bytes(root, NS_SERVER)


@dataclass(frozen=True)
class GetBootstrappingDataInput:
    signed_data_preferred: bool = False
    hw_model: str | None = None
    os_name: str | None = None
    os_version: str | None = None
    nonce: bytes | None = None

    def encode(self, encoding: str) -> bytes:
        obj: dict[str, Any] = {}
        if self.signed_data_preferred:
            obj["signed-data-preferred"] = [None]
        for name, value in (("hw-model", self.hw_model), ("os-name", self.os_name),
                            ("os-version", self.os_version)):
            if value is not None:
                obj[name] = value
        if self.nonce is not None:
            obj["nonce"] = base64.b64encode(self.nonce).decode()
        return _rpc_bytes(obj, encoding, "input")

    @classmethod
    def decode(cls, data: bytes, encoding: str) -> GetBootstrappingDataInput:
        """An empty body is an RPC without input (RFC 8040 §3.6.1)."""
        if not data.strip():
            return cls()
        obj = _keys("input", _rpc_doc(data, encoding, "input", "get-bootstrapping-data input"),
                    {"signed-data-preferred", "hw-model", "os-name", "os-version", "nonce"})
        if "signed-data-preferred" in obj:
            _empty("signed-data-preferred", obj["signed-data-preferred"])
        nonce = _b64("nonce", obj["nonce"]) if "nonce" in obj else None
        if nonce is not None and not 16 <= len(nonce) <= 32:
            raise ValidationError(f"nonce: {len(nonce)} bytes, the YANG length is 16..32")
        return cls(
            signed_data_preferred="signed-data-preferred" in obj,
            hw_model=_text("hw-model", obj["hw-model"]) if "hw-model" in obj else None,
            os_name=_text("os-name", obj["os-name"]) if "os-name" in obj else None,
            os_version=_text("os-version", obj["os-version"]) if "os-version" in obj else None,
            nonce=nonce,
        )


@dataclass(frozen=True)
class GetBootstrappingDataOutput:
    conveyed_information: bytes
    owner_certificate: bytes | None = None
    ownership_voucher: bytes | None = None
    reporting_level: str | None = None  # minimal | verbose

    def encode(self, encoding: str) -> bytes:
        self.check()
        obj: dict[str, Any] = {}
        if self.reporting_level is not None:
            obj["reporting-level"] = self.reporting_level
        obj["conveyed-information"] = base64.b64encode(self.conveyed_information).decode()
        if self.owner_certificate is not None:
            obj["owner-certificate"] = base64.b64encode(self.owner_certificate).decode()
        if self.ownership_voucher is not None:
            obj["ownership-voucher"] = base64.b64encode(self.ownership_voucher).decode()
        return _rpc_bytes(obj, encoding, "output")

    def check(self) -> None:
        if (self.owner_certificate is None) != (self.ownership_voucher is None):
            raise ValidationError("owner-certificate and ownership-voucher must come together "
                                  "(RFC 8572 §7.3 'must')")
        if self.reporting_level not in (None, "minimal", "verbose"):
            raise ValidationError(f"reporting-level: {self.reporting_level!r}")

    @classmethod
    def decode(cls, data: bytes, encoding: str) -> GetBootstrappingDataOutput:
        obj = _keys("output", _rpc_doc(data, encoding, "output",
                                       "get-bootstrapping-data output"),
                    {"reporting-level", "conveyed-information", "owner-certificate",
                     "ownership-voucher"})
        if "conveyed-information" not in obj:
            raise ValidationError("output: conveyed-information is mandatory")
        out = cls(
            conveyed_information=_b64("conveyed-information", obj["conveyed-information"]),
            owner_certificate=_b64("owner-certificate", obj["owner-certificate"])
            if "owner-certificate" in obj else None,
            ownership_voucher=_b64("ownership-voucher", obj["ownership-voucher"])
            if "ownership-voucher" in obj else None,
            reporting_level=_text("reporting-level", obj["reporting-level"])
            if "reporting-level" in obj else None,
        )
        out.check()
        return out


@dataclass(frozen=True)
class ReportProgressInput:
    progress_type: str
    message: str | None = None
    trust_anchor_certs: tuple[bytes, ...] = ()
    ssh_host_keys: tuple[tuple[str, bytes], ...] = field(default=())

    def encode(self, encoding: str) -> bytes:
        self.check()
        obj: dict[str, Any] = {"progress-type": self.progress_type}
        if self.message is not None:
            obj["message"] = self.message
        if self.ssh_host_keys:
            obj["ssh-host-keys"] = {"ssh-host-key": [
                {"algorithm": a, "key-data": base64.b64encode(k).decode()}
                for a, k in self.ssh_host_keys]}
        if self.trust_anchor_certs:
            obj["trust-anchor-certs"] = {"trust-anchor-cert": [
                base64.b64encode(c).decode() for c in self.trust_anchor_certs]}
        return _rpc_bytes(obj, encoding, "input")

    def check(self) -> None:
        if self.progress_type not in PROGRESS_TYPES:
            raise ValidationError(f"progress-type: {self.progress_type!r} is not one of the "
                                  "27 RFC 8572 enums")
        if (self.ssh_host_keys or self.trust_anchor_certs) and \
                self.progress_type != "bootstrap-complete":
            raise ValidationError("ssh-host-keys/trust-anchor-certs only when progress-type "
                                  "is bootstrap-complete (RFC 8572 §7.3 'when')")

    @classmethod
    def decode(cls, data: bytes, encoding: str) -> ReportProgressInput:
        obj = _keys("input", _rpc_doc(data, encoding, "input", "report-progress input"),
                    {"progress-type", "message", "ssh-host-keys", "trust-anchor-certs"})
        if "progress-type" not in obj:
            raise ValidationError("progress-type is mandatory")
        progress = _text("progress-type", obj["progress-type"])
        keys: list[tuple[str, bytes]] = []
        if "ssh-host-keys" in obj:
            for k in _keys("ssh-host-keys", obj["ssh-host-keys"], {"ssh-host-key"}).get(
                    "ssh-host-key", []):
                k = _keys("ssh-host-key", k, {"algorithm", "key-data"})
                keys.append((_text("ssh-host-key/algorithm", k.get("algorithm")),
                             _b64("ssh-host-key/key-data", k.get("key-data"))))
        tas: list[bytes] = []
        if "trust-anchor-certs" in obj:
            for c in _keys("trust-anchor-certs", obj["trust-anchor-certs"],
                           {"trust-anchor-cert"}).get("trust-anchor-cert", []):
                tas.append(_b64("trust-anchor-cert", c))
        out = cls(progress, _text("message", obj["message"]) if "message" in obj else None,
                  tuple(tas), tuple(keys))
        out.check()
        return out


def errors_body(error_type: str, error_tag: str, message: str, encoding: str) -> bytes:
    """ietf-restconf:errors with one error (RFC 8040 §7.1)."""
    err = {"error-type": error_type, "error-tag": error_tag, "error-message": message}
    if encoding == "json":
        return json.dumps({"ietf-restconf:errors": {"error": [err]}}).encode()
    root = ET.Element(f"{{{NS_RESTCONF}}}errors")
    _xml_build(root, NS_RESTCONF, {"error": err})
    return _xml_bytes(root, NS_RESTCONF)


def parse_errors(data: bytes, encoding: str) -> list[dict[str, str]]:
    """The error list of an ietf-restconf:errors body ([] when it is not one)."""
    try:
        if encoding == "json":
            doc = json.loads(data)
            errors = doc["ietf-restconf:errors"]["error"]
            return [{k: str(v) for k, v in e.items()} for e in errors]
        root = _xml(data, "errors")
        return [{_local(c, NS_RESTCONF, "error"): (c.text or "") for c in e} for e in root]
    except (ValueError, KeyError, TypeError, DecodeError, ValidationError, AttributeError):
        return []


# --- DHCPv6 OPTION_V6_SZTP_REDIRECT (RFC 8572 §8.3) -----------------------------------------


# a zone (RFC 6874 "%25eth0", or a bare "%eth0" as typed on a command line) is kept
_URI = re.compile(r"^https://(\[[0-9a-fA-F:.]+(?:%(?:25)?[A-Za-z0-9_.-]+)?\]|[A-Za-z0-9.-]+)"
                  r"(:\d{1,5})?/?$")


def encode_dhcpv6_uris(uris: Sequence[str]) -> bytes:
    """The option's data: repeated (uint16 length, URI)."""
    out = b""
    for uri in uris:
        raw = uri.encode()
        out += len(raw).to_bytes(2, "big") + raw
    return out


def decode_dhcpv6_uris(data: bytes) -> list[str]:
    """URIs of option 136's data; a URI that is not https://host[:port] is dropped, a
    truncated option refused whole (§8.3: an option without a valid URI is discarded)."""
    uris, i = [], 0
    while i < len(data):
        if i + 2 > len(data):
            raise DecodeError("DHCPv6 option 136: truncated uri-length")
        n = int.from_bytes(data[i:i + 2], "big")
        raw = data[i + 2:i + 2 + n]
        if len(raw) != n:
            raise DecodeError("DHCPv6 option 136: uri runs past the option")
        i += 2 + n
        text = raw.decode("ascii", "replace")
        if _URI.match(text):
            uris.append(text)
    if not uris:
        raise DecodeError("DHCPv6 option 136 carries no valid https:// URI")
    return uris


def uri_server(uri: str) -> BootstrapServer:
    """https://host[:port] as an (untrusted, no trust anchor) bootstrap server."""
    match = _URI.match(uri)
    if not match:
        raise DecodeError(f"{uri!r} is not https://<host>[:port]")
    host = match.group(1).strip("[]").replace("%25", "%")
    return BootstrapServer(host, int(match.group(2)[1:]) if match.group(2) else 443)
