"""JPY messages and the sealed header that carries a pledge's return address.

Constrained join proxy draft (-21) §4.4–4.5: a stateless join proxy wraps each pledge datagram
as the CBOR array ``[jpy_header: bstr, jpy_content: bstr]`` and sends it to the registrar's JPY
port; the registrar answers with ``[the same header, its DTLS bytes]``. The header is the proxy's
own business (its format is not standardised); here it holds the pledge's family, interface,
UDP port and address, sealed with a key only the proxy knows, so that the proxy keeps no table.

Two sealers, because the draft asks for two things that cannot both hold for one header:

* The registrar MUST treat the header as part of the connection identifier (§4.4: packets with a
  different header belong to a different pledge connection), and it echoes that header in every
  datagram of every flight it sends back. So the header of a pledge flow must be *the same bytes
  for every datagram* of that flow. :class:`FlowHeaderSealer` does that: deterministic
  authenticated encryption (AES-SIV, RFC 5297), one header per (pledge, key). This is the one a
  JPY relay uses. Freshness is bounded by key rotation: only the current and previous key open.
* §7 recommends, after RFC 8974, "AES-CCM with a 64-bit tag, a sequence number and a replay
  window". That fits state that comes back exactly once (an RFC 8974 token answered by one
  response), not a JPY connection: a fresh header per datagram splits one DTLS handshake into
  many registrar connections, and the window drops the second datagram of a registrar flight.
  :class:`SequencedHeaderSealer` implements it (sequence number in the nonce, RFC 6479 sliding
  window) for such once-only uses, and so both can be measured (``bench/jpy_seal_open.py``).

Sans-IO: keys come from the caller (draw them from an injected rng), nothing here reads a clock.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address
from typing import Generic, Protocol, TypeVar

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESSIV

from .cbor_strict import loads_exact
from .errors import DecodeError, SignatureError, UsageError, ValidationError

# A UDP payload cannot be longer (IPv6 jumbograms aside), so neither can a JPY message.
MAX_MESSAGE_SIZE = 65535
# §4.5.2: the header SHOULD be at most 32 bytes; §4.5.4: CBOR framing adds 3 to 6 (≤ 38).
MAX_HEADER_SIZE = 32
MAX_OVERHEAD = 38


@dataclass(frozen=True, slots=True)
class JpyMessage:
    """One JPY message: the proxy's opaque header and the relayed UDP payload."""

    header: bytes
    content: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.header, bytes) or not isinstance(self.content, bytes):
            raise UsageError("JPY header and content must be bytes")

    def encode(self) -> bytes:
        """Definite-length CBOR, so the draft's Appendix A examples re-encode byte for byte."""
        data = cbor2.dumps([self.header, self.content])
        if len(data) > MAX_MESSAGE_SIZE:
            # Callers keep payload + MAX_OVERHEAD under the path MTU; this is the hard limit.
            raise UsageError(f"JPY message of {len(data)} bytes does not fit in a UDP datagram")
        return data

    @classmethod
    def decode(cls, data: bytes) -> JpyMessage:
        """Parse a JPY message. §4.5.7: an array of two *or more* elements, of which only the
        first two are used; anything else (not an array, fewer elements, non-bstr, trailing
        bytes after the array) is a :class:`DecodeError`."""
        if isinstance(data, memoryview):
            data = bytes(data)
        item = loads_exact(data, "JPY message", MAX_MESSAGE_SIZE)
        if not isinstance(item, list):
            raise DecodeError(f"JPY message is a CBOR {type(item).__name__}, not an array")
        if len(item) < 2:
            raise DecodeError(f"JPY message has {len(item)} elements, needs at least 2")
        header, content = item[0], item[1]
        if type(header) is not bytes:
            raise DecodeError("JPY header is not a byte string")
        if type(content) is not bytes:
            raise DecodeError("JPY content is not a byte string")
        return cls(header, content)




class Family(IntEnum):
    """Address family of the pledge, as the draft's example struct numbers it (0..1)."""

    IPV6 = 0
    IPV4 = 1


@dataclass(frozen=True, slots=True)
class PledgeEndpoint:
    """Where a pledge datagram came from, and so where the answer goes."""

    address: IPv6Address | IPv4Address
    port: int
    ifindex: int

    def __post_init__(self) -> None:
        if not isinstance(self.address, IPv6Address | IPv4Address):
            raise UsageError("pledge address must be an IPv6Address or IPv4Address")
        if type(self.port) is not int or not 0 < self.port <= 0xFFFF:
            raise UsageError(f"pledge UDP port {self.port!r} is not 1..65535")
        if type(self.ifindex) is not int or not 0 <= self.ifindex <= 0xFFFFFFFF:
            raise UsageError(f"ifindex {self.ifindex!r} is not a 32-bit unsigned integer")

    @property
    def family(self) -> Family:
        return Family.IPV6 if self.address.version == 6 else Family.IPV4


# Plaintext layout, 15 bytes (the draft's example struct, widened where Linux needs it):
#   0      family: 0 IPv6, 1 IPv4
#   1..4   ifindex, uint32 (Linux ifindexes are ints and grow with interface churn: 1 byte is
#          not enough on a router with containers or tunnels)
#   5..6   UDP port, uint16, never 0
#   7..14  IPv6: the interface identifier, i.e. the low 64 bits of an fe80::/64 address;
#          IPv4: the 4 address bytes then 4 zero bytes.
# Only the IID is kept for IPv6 because the full 16-byte address does not fit in 32 bytes once
# a key id, a nonce or synthetic IV and a tag are added; pledges talk to the proxy from
# link-local addresses (RFC 8995 §4.1, join-proxy §4.3), so the fe80:: prefix carries no
# information. A pledge sending from any other IPv6 address is refused at seal time.
_PLAIN = struct.Struct(">BIH8s")
PLAINTEXT_SIZE = _PLAIN.size
_LINK_LOCAL_PREFIX = bytes.fromhex("fe80000000000000")
_LINK_LOCAL_INT = int.from_bytes(_LINK_LOCAL_PREFIX, "big") << 64


# An IPv6 pledge's plaintext packed from the address as one int: the same 15 bytes as _PLAIN,
# without IPv6Address.packed (two Python calls and a 16-byte object per datagram).
_PLAIN_V6 = struct.Struct(">BIHQ")
_pack_v6 = _PLAIN_V6.pack  # bound once: seal calls it per datagram
_IID_MASK = (1 << 64) - 1
_LINK_LOCAL_TOP = _LINK_LOCAL_INT >> 64


def _pack(pledge: PledgeEndpoint) -> bytes:
    if not isinstance(pledge, PledgeEndpoint):
        raise UsageError("seal() takes a PledgeEndpoint")
    address = pledge.address
    if address.__class__ is IPv6Address:
        ip = address._ip  # the address as an int: int(address) would add a Python call
        if ip >> 64 == _LINK_LOCAL_TOP:
            return _pack_v6(0, pledge.ifindex, pledge.port, ip & _IID_MASK)  # IPV6
    raw = address.packed
    if len(raw) == 16:
        if raw[:8] != _LINK_LOCAL_PREFIX:
            # Peer input (the datagram's source), not a local mistake: the relay counts it.
            raise ValidationError(f"pledge address {pledge.address} is not in fe80::/64")
        return _PLAIN.pack(0, pledge.ifindex, pledge.port, raw[8:])  # Family.IPV6
    return _PLAIN.pack(Family.IPV4, pledge.ifindex, pledge.port, raw + bytes(4))


def _endpoint(address: IPv6Address, port: int, ifindex: int) -> PledgeEndpoint:
    """A PledgeEndpoint from fields whose ranges the 15-byte layout already guarantees (a
    uint16 port checked non-zero, a uint32 ifindex, an IPv6Address): __post_init__'s checks,
    meant for callers' values, would repeat them on every datagram."""
    endpoint = object.__new__(PledgeEndpoint)
    object.__setattr__(endpoint, "address", address)
    object.__setattr__(endpoint, "port", port)
    object.__setattr__(endpoint, "ifindex", ifindex)
    return endpoint


# Authenticated plaintexts already turned into endpoints: a flow's header, and so its
# plaintext, is the same for every datagram. Bounded; the AEAD still checks every header.
_UNPACKED: dict[bytes, PledgeEndpoint] = {}
_UNPACKED_MAX = 4096
_unpacked_get = _UNPACKED.get  # bound once (the table is cleared, never replaced)


def _unpack(plain: bytes) -> PledgeEndpoint:
    known = _UNPACKED.get(plain)
    if known is not None:
        return known
    endpoint = _unpack_fields(plain)
    if len(_UNPACKED) >= _UNPACKED_MAX:
        _UNPACKED.clear()
    _UNPACKED[plain] = endpoint
    return endpoint


def _unpack_fields(plain: bytes) -> PledgeEndpoint:
    # Reaching here means the tag verified, so a bad field is our own bug or a leaked key;
    # still an error, never a crash.
    family, ifindex, port, addr = _PLAIN.unpack(plain)
    if port == 0:
        raise DecodeError("sealed header holds UDP port 0")
    if family == 0:  # Family.IPV6
        return _endpoint(IPv6Address(_LINK_LOCAL_INT | int.from_bytes(addr, "big")), port,
                         ifindex)  # fmt: skip
    if family == Family.IPV4 and addr[4:] == bytes(4):
        return PledgeEndpoint(IPv4Address(addr[:4]), port, ifindex)
    raise DecodeError("sealed header has a bad family or IPv4 padding")


# ---------------------------------------------------------------------------------------------
# Keys: one current and one previous, each named by a 1-byte id carried in clear


class HeaderSealer(Protocol):
    """What a stateless relay needs from a sealer."""

    def seal(self, pledge: PledgeEndpoint) -> bytes: ...

    def open(self, header: bytes) -> PledgeEndpoint: ...

    def rotate(self, key: bytes, key_id: int | None = None) -> None: ...


def _check_key_id(key_id: object) -> int:
    if type(key_id) is not int or not 0 <= key_id <= 0xFF:
        raise UsageError(f"key id {key_id!r} is not 0..255")
    return key_id


class _HasKeyId(Protocol):
    key_id: int


Slot = TypeVar("Slot", bound=_HasKeyId)


class _KeyRing(Generic[Slot]):
    """The current slot seals; current and previous open. Rotating drops the older one, which
    is how a header stops opening: draft §4.5.5 suggests rotating about every 24 h, and a
    header then lives for one to two rotation periods."""

    def __init__(self, slot: Slot) -> None:
        self.current = slot
        self.previous: Slot | None = None

    def push(self, slot: Slot) -> None:
        taken = {self.current.key_id}
        if self.previous is not None:
            taken.add(self.previous.key_id)
        if slot.key_id in taken:
            # Two live keys with one id would make a header ambiguous to open.
            raise UsageError(f"key id {slot.key_id} is still in use")
        self.previous, self.current = self.current, slot

    def next_id(self) -> int:
        return (self.current.key_id + 1) & 0xFF

    def find(self, key_id: int) -> Slot:
        if key_id == self.current.key_id:
            return self.current
        if self.previous is not None and key_id == self.previous.key_id:
            return self.previous
        raise ValidationError(f"header sealed with key id {key_id}, which is not live")


# ---------------------------------------------------------------------------------------------
# The JPY header sealer: deterministic, one header per pledge flow


@dataclass(slots=True)
class _SivSlot:
    key_id: int
    aead: AESSIV
    kid: bytes = b""  # the key id byte, and it as AESSIV's associated data: made once
    associated: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.kid = bytes([self.key_id])
        self.associated = [self.kid]


class FlowHeaderSealer:
    """Seals a :class:`PledgeEndpoint` into a 32-byte header that is the same for every
    datagram of the pledge's flow, as the registrar's connection lookup requires.

    Header: ``key id (1) | AES-SIV synthetic IV (16) | ciphertext (15)`` = 32 bytes, the key id
    also authenticated as associated data. AES-SIV is the standard deterministic AEAD: equal
    plaintexts give equal headers (that is the point) and nothing else leaks; any bit flipped
    fails the 128-bit SIV check. Key: 32, 48 or 64 bytes (AES-128/192/256-SIV).
    """

    HEADER_SIZE = 1 + 16 + PLAINTEXT_SIZE

    def __init__(self, key: bytes, key_id: int = 0) -> None:
        self._keys = _KeyRing(self._slot(key, key_id))

    @staticmethod
    def _slot(key: bytes, key_id: object) -> _SivSlot:
        if not isinstance(key, bytes) or len(key) not in (32, 48, 64):
            raise UsageError("AES-SIV key must be 32, 48 or 64 bytes")
        return _SivSlot(_check_key_id(key_id), AESSIV(key))

    @property
    def key_id(self) -> int:
        return self._keys.current.key_id

    def rotate(self, key: bytes, key_id: int | None = None) -> None:
        """Make ``key`` current; the old current key still opens, the one before no longer."""
        self._keys.push(self._slot(key, self._keys.next_id() if key_id is None else key_id))

    def seal(self, pledge: PledgeEndpoint) -> bytes:
        slot = self._keys.current
        return slot.kid + slot.aead.encrypt(_pack(pledge), slot.associated)

    def open(self, header: bytes) -> PledgeEndpoint:
        """The pledge a header was sealed for. Wrong size: DecodeError; key id neither current
        nor previous: ValidationError; forged or corrupted: SignatureError."""
        if not isinstance(header, bytes):
            raise UsageError("open() takes bytes")
        if len(header) != self.HEADER_SIZE:
            raise DecodeError(f"header is {len(header)} bytes, expected {self.HEADER_SIZE}")
        slot = self._keys.find(header[0])
        try:
            plain = slot.aead.decrypt(header[1:], slot.associated)
        except InvalidTag as exc:
            raise SignatureError("header does not authenticate") from exc
        return _unpack(plain)


# ---------------------------------------------------------------------------------------------
# The kernel's header: two AES blocks, what BPF's AES-ECB kfuncs can seal and open


@dataclass(slots=True)
class _EcbSlot:
    key_id: int
    cipher: Cipher[modes.ECB]


_BLOCK = struct.Struct(">BIH8sB")  # family, ifindex, port, IID, key id: one AES block
_TAG_DOMAIN = 0x80  # family byte of the tag's block: no C block is ever a tag


class BlockHeaderSealer:
    """The JPY header the kernel relay (ebpf/jpy.bpf.c) seals and opens, byte for byte:
    ``key id (1) | C = AES(k, P) (16) | T = AES(k, P')[:15] (15)`` = 32 bytes, where
    ``P = family 0 | ifindex (4) | port (2) | IID (8) | key id`` (one block: the draft's
    §4.5.6 example, widened to a 32-bit ifindex) and ``P'`` is P with the family byte 0x80.

    C hides the pledge (deterministically, as AES-SIV does: one header per pledge flow); T is
    a 120-bit PRF tag over P, so a forgery is accepted with odds 2^-120 per try, against the
    draft's example (a zero word that must decrypt to zero) at 2^-32. Only what an AES block
    cipher gives: the BPF crypto kfuncs have AES-ECB but no AEAD. IPv6 link-local pledges
    only (that is all a join link has). Key: 32 bytes (AES-256).
    """

    HEADER_SIZE = 32

    def __init__(self, key: bytes, key_id: int = 0) -> None:
        self._keys = _KeyRing(self._slot(key, key_id))

    @staticmethod
    def _slot(key: bytes, key_id: object) -> _EcbSlot:
        if not isinstance(key, bytes) or len(key) != 32:
            raise UsageError("AES-256 key must be 32 bytes")
        return _EcbSlot(_check_key_id(key_id), Cipher(algorithms.AES(key), modes.ECB()))

    @property
    def key_id(self) -> int:
        return self._keys.current.key_id

    @property
    def previous_key_id(self) -> int | None:
        previous = self._keys.previous
        return None if previous is None else previous.key_id

    def rotate(self, key: bytes, key_id: int | None = None) -> None:
        self._keys.push(self._slot(key, self._keys.next_id() if key_id is None else key_id))

    def seal(self, pledge: PledgeEndpoint) -> bytes:
        if not isinstance(pledge, PledgeEndpoint):
            raise UsageError("seal() takes a PledgeEndpoint")
        raw = pledge.address.packed
        if len(raw) != 16 or raw[:8] != _LINK_LOCAL_PREFIX:
            raise ValidationError(f"pledge address {pledge.address} is not in fe80::/64")
        slot = self._keys.current
        plain = _BLOCK.pack(Family.IPV6, pledge.ifindex, pledge.port, raw[8:], slot.key_id)
        enc = slot.cipher.encryptor()
        out = enc.update(plain + bytes([_TAG_DOMAIN]) + plain[1:]) + enc.finalize()
        return bytes([slot.key_id]) + out[:16] + out[16:31]

    def open(self, header: bytes) -> PledgeEndpoint:
        """Wrong size: DecodeError; key id not live: ValidationError; forged: SignatureError."""
        if not isinstance(header, bytes):
            raise UsageError("open() takes bytes")
        if len(header) != self.HEADER_SIZE:
            raise DecodeError(f"header is {len(header)} bytes, expected {self.HEADER_SIZE}")
        slot = self._keys.find(header[0])
        dec = slot.cipher.decryptor()
        plain = dec.update(header[1:17]) + dec.finalize()
        enc = slot.cipher.encryptor()
        tag = enc.update(bytes([_TAG_DOMAIN]) + plain[1:]) + enc.finalize()
        # compare in full before deciding (no early exit on the first bad byte)
        bad = plain[0] ^ Family.IPV6 | plain[15] ^ slot.key_id
        for a, b in zip(tag[:15], header[17:], strict=True):
            bad |= a ^ b
        if bad:
            raise SignatureError("header does not authenticate")
        _, ifindex, port, iid, _ = _BLOCK.unpack(plain)
        if port == 0:
            raise DecodeError("sealed header holds UDP port 0")
        return PledgeEndpoint(IPv6Address(_LINK_LOCAL_PREFIX + iid), port, ifindex)


# ---------------------------------------------------------------------------------------------
# Once-only state: AES-CCM-8, sequence number in the nonce, replay window


class ReplayWindow:
    """Sliding window over sequence numbers, as RFC 6479's: accepts each number once, and
    nothing more than ``size - 1`` behind the highest seen.

    Kept as a ring of ``size`` slots, slot ``n % size`` holding the last number accepted into
    it, rather than RFC 6479's bitmap: moving forward, which nearly every number does, is then
    one store instead of shifting and masking a ``size``-bit int. A number ``n`` inside the
    window was seen iff its slot holds ``n``: any other number in that slot is a multiple of
    ``size`` away from ``n``, and the window never accepts one of those after ``n`` (a larger
    one pushes ``n`` out of the window, a smaller one is then too old). The ring costs a list
    entry and an int per slot (≈ 40 bytes): little for the windows of hundreds in use."""

    __slots__ = ("_seen", "_top", "size")

    def __init__(self, size: int = 128) -> None:
        if type(size) is not int or size < 1:
            raise UsageError("replay window size must be a positive int")
        self.size = size
        self._top = -1
        self._seen: list[int | None] = [None] * size

    def check_and_update(self, seq: int) -> None:
        """Record ``seq``; ValidationError if it was seen or is too old. Call only after the
        sequence number has been authenticated, or a forger could slide the window.
        (SequencedHeaderSealer.open has the first case in line.)"""
        if seq > self._top:
            self._seen[seq % self.size] = seq
            self._top = seq
            return
        if self._top - seq >= self.size:
            raise ValidationError(f"sequence {seq} is older than the replay window")
        slot = seq % self.size
        if self._seen[slot] == seq:
            raise ValidationError(f"sequence {seq} was already accepted (replay)")
        self._seen[slot] = seq


class _CcmSlot:
    """One AES-CCM key with its counter and window, holding what seal and open use on every
    header ready-made: the key id shifted into the nonce's top byte, and the AEAD's bound
    methods (one attribute lookup instead of two)."""

    __slots__ = ("decrypt", "encrypt", "key_id", "next_seq", "nonce_base", "window")

    def __init__(self, key_id: int, aead: AESCCM, window: ReplayWindow) -> None:
        self.key_id = key_id
        self.nonce_base = key_id << 48  # nonce = key id (1) | sequence (6), as one int
        self.encrypt = aead.encrypt
        self.decrypt = aead.decrypt
        self.next_seq = 0
        self.window = window


_SEQ_MASK = (1 << 48) - 1
_int_from_bytes = int.from_bytes  # bound once: open calls it per header


class SequencedHeaderSealer:
    """Seals a :class:`PledgeEndpoint` into a 30-byte header that opens exactly once.

    Header: ``key id (1) | sequence (6) | AES-CCM ciphertext (15) | tag (8)`` = 30 bytes. The
    nonce is ``key id | sequence`` (7 bytes, CCM's minimum), so a changed id or sequence fails
    the tag. Each seal takes the next number from the current key's counter; each open checks
    the key's replay window after the tag. Not for JPY connections (module docstring).

    Keys must be fresh (drawn from an rng at start and at rotation): counters start at 0 and are
    never persisted, so reusing a key across restarts would reuse nonces.
    """

    HEADER_SIZE = 1 + 6 + PLAINTEXT_SIZE + 8
    TAG_LENGTH = 8
    MAX_SEQUENCE = _SEQ_MASK

    def __init__(self, key: bytes, key_id: int = 0, *, window: int = 128) -> None:
        self._window = window
        self._keys = _KeyRing(self._slot(key, key_id))

    def _slot(self, key: bytes, key_id: object) -> _CcmSlot:
        if not isinstance(key, bytes) or len(key) not in (16, 24, 32):
            raise UsageError("AES-CCM key must be 16, 24 or 32 bytes")
        aead = AESCCM(key, tag_length=self.TAG_LENGTH)
        return _CcmSlot(_check_key_id(key_id), aead, ReplayWindow(self._window))

    @property
    def key_id(self) -> int:
        return self._keys.current.key_id

    @property
    def next_sequence(self) -> int:
        return self._keys.current.next_seq

    def rotate(self, key: bytes, key_id: int | None = None) -> None:
        """Make ``key`` current (its counter and window start afresh); the old current key
        still opens, the one before no longer."""
        self._keys.push(self._slot(key, self._keys.next_id() if key_id is None else key_id))

    # seal and open run once per datagram, so they do their work in line: each Python call or
    # attribute lookup saved is a few percent of the AEAD's own cost (bench/jpy_seal_open.py).
    def seal(self, pledge: PledgeEndpoint) -> bytes:
        # _pack's first case in line: a PledgeEndpoint from an fe80::/64 address
        if (pledge.__class__ is PledgeEndpoint
                and (address := pledge.address).__class__ is IPv6Address
                and (ip := address._ip) >> 64 == _LINK_LOCAL_TOP):
            plain = _pack_v6(0, pledge.ifindex, pledge.port, ip & _IID_MASK)
        else:
            plain = _pack(pledge)
        slot = self._keys.current
        seq = slot.next_seq
        if seq > _SEQ_MASK:
            raise UsageError("sequence numbers exhausted for this key: rotate it")
        slot.next_seq = seq + 1
        nonce = (slot.nonce_base | seq).to_bytes(7, "big")
        return nonce + slot.encrypt(nonce, plain, None)

    def open(self, header: bytes) -> PledgeEndpoint:
        """The pledge a header was sealed for. Wrong size: DecodeError; retired key id, replay
        or too old for the window: ValidationError; forged or corrupted: SignatureError."""
        if header.__class__ is not bytes and not isinstance(header, bytes):
            raise UsageError("open() takes bytes")
        if len(header) != 30:  # HEADER_SIZE
            raise DecodeError(f"header is {len(header)} bytes, expected {self.HEADER_SIZE}")
        slot = self._keys.current
        if header[0] != slot.key_id:
            slot = self._keys.find(header[0])
        nonce = header[:7]
        try:
            plain = slot.decrypt(nonce, header[7:], None)
        except InvalidTag as exc:
            raise SignatureError("header does not authenticate") from exc
        seq = _int_from_bytes(nonce, "big") & _SEQ_MASK
        window = slot.window
        if seq > window._top:  # the newest yet, as nearly every header is: check_and_update
            window._seen[seq % window.size] = seq  # in line
            window._top = seq
        else:
            window.check_and_update(seq)
        known = _unpacked_get(plain)
        return known if known is not None else _unpack(plain)
