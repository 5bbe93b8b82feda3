"""The few DHCPv6 messages an SZTP device needs (RFC 8415), sans-IO: an Information-Request
asking for OPTION_V6_SZTP_REDIRECT (136, RFC 8572 §8.3) and the Reply's options.

    data = information_request(txid, duid)          # to [ff02::1:2]:547 from port 546
    reply = parse_reply(data, txid)                 # {option code: [values]}, DecodeError
    uris = brski.sztp.decode_dhcpv6_uris(reply[136][0])
"""

from __future__ import annotations

from .errors import DecodeError, UsageError

INFORMATION_REQUEST = 11
REPLY = 7
OPTION_CLIENTID = 1
OPTION_SERVERID = 2
OPTION_ORO = 6
OPTION_ELAPSED_TIME = 8
OPTION_SZTP_REDIRECT = 136
CLIENT_PORT, SERVER_PORT = 546, 547
ALL_SERVERS = "ff02::1:2"


def _option(code: int, data: bytes) -> bytes:
    return code.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data


def duid_ll(mac: bytes) -> bytes:
    """DUID-LL (type 3) for an Ethernet address (RFC 8415 §11.4)."""
    if len(mac) != 6:
        raise UsageError("an Ethernet address has 6 bytes")
    return (3).to_bytes(2, "big") + (1).to_bytes(2, "big") + mac


def information_request(txid: int, duid: bytes, options: tuple[int, ...] = (
        OPTION_SZTP_REDIRECT,)) -> bytes:
    if not 0 <= txid < 1 << 24:
        raise UsageError("transaction-id is 24 bits")
    oro = b"".join(code.to_bytes(2, "big") for code in options)
    return (bytes([INFORMATION_REQUEST]) + txid.to_bytes(3, "big")
            + _option(OPTION_CLIENTID, duid) + _option(OPTION_ELAPSED_TIME, b"\x00\x00")
            + _option(OPTION_ORO, oro))


def parse_reply(data: bytes, txid: int) -> dict[int, list[bytes]]:
    """The options of a Reply to ``txid``; DecodeError for anything else."""
    if len(data) < 4:
        raise DecodeError("DHCPv6 message shorter than its header")
    if data[0] != REPLY:
        raise DecodeError(f"DHCPv6 message type {data[0]}, not Reply")
    if int.from_bytes(data[1:4], "big") != txid:
        raise DecodeError("DHCPv6 Reply for another transaction")
    options: dict[int, list[bytes]] = {}
    i = 4
    while i < len(data):
        if i + 4 > len(data):
            raise DecodeError("DHCPv6 option header truncated")
        code = int.from_bytes(data[i:i + 2], "big")
        length = int.from_bytes(data[i + 2:i + 4], "big")
        value = data[i + 4:i + 4 + length]
        if len(value) != length:
            raise DecodeError(f"DHCPv6 option {code} runs past the message")
        options.setdefault(code, []).append(value)
        i += 4 + length
    return options
