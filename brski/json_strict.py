"""One strict JSON decoder for what peers send (vouchers, status telemetry, audit logs).

``json.loads`` accepts things our encoders, our store and other parsers cannot take back: a
member given twice (the last one wins), ``NaN``/``Infinity``, a number like ``1e999`` that
becomes infinity, and ``"\\ud800"``, a lone surrogate that is no Unicode text (UTF-8 encoding
and SQLite refuse it). Decoding refuses all of these, so what decodes re-encodes.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final

from .errors import DecodeError

_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def loads_strict(data: bytes | str, what: str) -> Any:
    """One JSON value from UTF-8 ``data`` (or text), refusing what cannot be re-encoded."""
    try:
        # RFC 8259 §8.1: JSON between systems is UTF-8; json.loads(bytes) would guess UTF-16/32.
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        value = _DECODER.decode(text)
    except _Refused as exc:
        raise DecodeError(f"{what} is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{what} is not valid JSON: not UTF-8 text (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise DecodeError(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}") from exc
    except (ValueError, RecursionError) as exc:  # an integer of > 4300 digits, deep nesting
        raise DecodeError(f"{what} is not valid JSON: {_short_reason(exc)}") from exc
    # A lone surrogate can only come from a \u escape, or from text given as str (the UTF-8
    # codec refuses encoded surrogates): skip the walk over every string when neither can have
    # brought one. ASCII text, what peers send, has none: isascii() answers at memory speed,
    # the regular expression took half the time of the parse over a voucher-request.
    if "\\u" in text or (data is text and not text.isascii() and _SURROGATE.search(text)):
        _check_text(value, what)
    return value


class _Refused(ValueError):
    pass


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last duplicate silently; two parsers disagreeing on a nonce is a
    # classic signature-bypass shape, so refuse.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key {key[:60]!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} is out of range for a double")
    return value


# One decoder for every call: json.loads with hooks builds a new one (and its scanner) each time.
# It keeps no state between calls.
_DECODER: Final = json.JSONDecoder(object_pairs_hook=_unique_object, parse_constant=_no_constant,
                                   parse_float=_finite_float)


def _short_reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return "a number with too many digits"


def _check_text(value: Any, what: str) -> None:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                raise DecodeError(f"{what} holds a lone surrogate escape (\\ud800-\\udfff), "
                                  "which is not Unicode text")
        elif isinstance(node, dict):
            stack.extend(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
