"""Operator command-line tools over the protocol library. These, unlike the library itself,
read files and the clock."""
