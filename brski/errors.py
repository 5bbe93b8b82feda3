"""Error types shared by the whole protocol library.

Two families, after the sans-IO models (style-models.md, habit 5): ``UsageError`` means the
caller misused the library (a bug or a bad configuration: raise it), while everything under
``ProtocolError`` means the *peer* sent something unusable (catch it at the I/O edge, count it,
drop it). Decoders raise nothing else, whatever the input.
"""


class BrskiError(Exception):
    """Root of every exception the protocol library raises on purpose."""


class UsageError(BrskiError):
    """Local misuse: wrong argument types, impossible combinations, missing keys."""


class ProtocolError(BrskiError):
    """Input from the outside world that cannot be accepted."""


class DecodeError(ProtocolError):
    """Bytes that do not parse: truncated, malformed, oversized, wrong types."""


class ValidationError(ProtocolError):
    """Well-formed input that breaks a rule (a nonce of the wrong length, a missing leaf)."""


class SignatureError(ProtocolError):
    """A signature, MAC or certificate chain that does not verify."""
