"""Operator command-line tools over the protocol library (brski-pki, brski-voucher).

These, unlike the library itself, read files and the clock."""
