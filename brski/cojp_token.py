"""The sealed state a stateless CoJP join proxy puts in the CoAP token (RFC 9031 §7.1).

The proxy forwards a pledge's Join Request to the JRC as a NON request whose token is this
object; the JRC echoes the token in its response (RFC 9031 §7.1 requires it to support RFC 8974
extended tokens), and the object alone tells the proxy where the response goes and what the
pledge's own token and message were. The proxy keeps no table.

It is the same concept as the JPY header (brski/jpy.py: a :class:`PledgeEndpoint` under AES-SIV
with a key only the proxy holds, a 1-byte key id in clear, current and previous key open) in
another format, because a token is answered once, by one response, and so can carry more:

    plaintext (21..29 bytes)
      0       flags: bit 0 = the pledge's request was CON (answer with a piggybacked ACK)
      1..4    ifindex of the join link, uint32
      5..6    the pledge's UDP port, uint16, never 0
      7..14   the pledge's interface identifier (the low 64 bits of its fe80:: address)
      15..18  when it was sealed: the caller's clock in whole seconds, uint32
      19..20  the pledge's message ID, uint16
      21..    the pledge's own token, 0..8 bytes (RFC 7252 tokens; a pledge has no use for more)
    token = key id (1) | AES-SIV synthetic IV (16) | ciphertext  = 38..46 bytes

Why not 12 bytes (the most aiocoap 0.4.17 encodes right): the return address alone is 14 bytes
(interface, port, IID) before any integrity tag, and a proxy that cannot tell a forged token
from its own would send JRC-looking packets wherever a backbone attacker likes. So the token is
an RFC 8974 extended token (TKL 13), which brski/coap_datagram.py encodes; the JRC must accept
extended tokens (RFC 9031 §7.1 says it MUST).

Freshness: a token opens only under the current or previous key, and only within ``lifetime``
seconds of its sealing time (a response to a NON request comes within seconds; an old one is a
replay or a JRC far behind). Deterministic sealing means a pledge's retransmission forwarded in
the same second gets the same token, which is harmless: the JRC answers each, the pledge takes
the first. Sans-IO: keys and the clock come from the caller.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv6Address

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from .errors import DecodeError, SignatureError, UsageError, ValidationError
from .jpy import PledgeEndpoint, _check_key_id, _KeyRing

MAX_PLEDGE_TOKEN = 8
DEFAULT_LIFETIME = 60
_LINK_LOCAL_PREFIX = bytes.fromhex("fe80000000000000")
_PLAIN = struct.Struct(">BIH8sIH")
FLAG_CONFIRMABLE = 0x01
MIN_SIZE = 1 + 16 + _PLAIN.size
MAX_SIZE = MIN_SIZE + MAX_PLEDGE_TOKEN


@dataclass(frozen=True, slots=True)
class TokenState:
    """What the proxy needs to answer a pledge: where it is and what it sent."""

    pledge: PledgeEndpoint
    message_id: int
    token: bytes
    confirmable: bool

    def __post_init__(self) -> None:
        if not isinstance(self.pledge, PledgeEndpoint):
            raise UsageError("TokenState.pledge must be a PledgeEndpoint")
        if type(self.message_id) is not int or not 0 <= self.message_id <= 0xFFFF:
            raise UsageError(f"message ID {self.message_id!r} is not 0..65535")
        if not isinstance(self.token, bytes):
            raise UsageError("the pledge's token must be bytes")


@dataclass(slots=True)
class _SivSlot:
    key_id: int
    aead: AESSIV


class TokenSealer:
    """Seals a :class:`TokenState` into a 38..46-byte CoAP token and opens it again."""

    def __init__(self, key: bytes, key_id: int = 0, *, lifetime: int = DEFAULT_LIFETIME) -> None:
        if type(lifetime) is not int or lifetime < 1:
            raise UsageError("token lifetime must be a positive number of seconds")
        self.lifetime = lifetime
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

    def seal(self, state: TokenState, now: int) -> bytes:
        """The token for ``state`` at time ``now`` (seconds, any epoch the opener shares).
        A pledge token over 8 bytes or a pledge not on fe80::/64 is the peer's doing:
        ValidationError, for the relay to count."""
        if not isinstance(state, TokenState):
            raise UsageError("seal() takes a TokenState")
        pledge = state.pledge
        raw = pledge.address.packed
        if len(raw) != 16 or raw[:8] != _LINK_LOCAL_PREFIX:
            raise ValidationError(f"pledge address {pledge.address} is not in fe80::/64")
        if len(state.token) > MAX_PLEDGE_TOKEN:
            raise ValidationError(f"the pledge's token has {len(state.token)} bytes, more "
                                  f"than {MAX_PLEDGE_TOKEN}")
        flags = FLAG_CONFIRMABLE if state.confirmable else 0
        plain = _PLAIN.pack(flags, pledge.ifindex, pledge.port, raw[8:], now & 0xFFFFFFFF,
                            state.message_id) + state.token
        slot = self._keys.current
        kid = bytes([slot.key_id])
        return kid + slot.aead.encrypt(plain, [kid])

    def open(self, token: bytes, now: int) -> TokenState:
        """The state a token was sealed with. Wrong size: DecodeError; a key id that is not
        live or a sealing time outside the lifetime: ValidationError; forged or corrupted:
        SignatureError."""
        if not isinstance(token, bytes):
            raise UsageError("open() takes bytes")
        if not MIN_SIZE <= len(token) <= MAX_SIZE:
            raise DecodeError(f"token is {len(token)} bytes, not {MIN_SIZE}..{MAX_SIZE}")
        slot = self._keys.find(token[0])
        try:
            plain = slot.aead.decrypt(token[1:], [token[:1]])
        except InvalidTag as exc:
            raise SignatureError("token does not authenticate") from exc
        flags, ifindex, port, iid, sealed, mid = _PLAIN.unpack_from(plain)
        age = (now - sealed) & 0xFFFFFFFF
        if age > self.lifetime and (sealed - now) & 0xFFFFFFFF > 1:
            raise ValidationError(f"token sealed {age} s ago, lifetime {self.lifetime} s")
        if port == 0 or flags & ~FLAG_CONFIRMABLE:
            # The tag verified: our own bug or a leaked key. An error, never a crash.
            raise DecodeError("sealed token holds port 0 or unknown flags")
        pledge = PledgeEndpoint(IPv6Address(_LINK_LOCAL_PREFIX + iid), port, ifindex)
        return TokenState(pledge, mid, plain[_PLAIN.size:], bool(flags & FLAG_CONFIRMABLE))
