"""The relay modes (circuit, nat66, ipip, coaps, jpy, cojp) that carry a pledge's traffic, by name.

A new mode is a RelayMode subclass in its own module plus one line here (and its name in
config.KNOWN_MODES); the control plane needs no change."""

import importlib

from .base import RelayContext, RelayMode

_MODES = {
    "circuit": ("circuit", "CircuitMode"),
    "nat66": ("nat66", "Nat66Mode"),
    "ipip": ("ipip", "IpipMode"),
    "coaps": ("coaps", "CoapsMode"),
    "jpy": ("jpy", "JpyMode"),
    "cojp": ("cojp", "CojpMode"),
}


# The modes that can leave kernel state behind a killed run (nftables table, BPF programs,
# proxy NDP entries): a start without them cleans up by importing only these, since an
# unconfigured mode's libraries may be absent here (kernel/features.py).
_KERNEL_STATE = ("nat66", "ipip")


def mode_names() -> list[str]:
    return list(_MODES)


def modes_with_kernel_state() -> list[str]:
    return list(_KERNEL_STATE)


def mode_class(name: str) -> type[RelayMode]:
    module_name, class_name = _MODES[name]
    module = importlib.import_module(f".{module_name}", __name__)
    cls = getattr(module, class_name)
    assert issubclass(cls, RelayMode) and cls.name == name
    return cls


__all__ = ["RelayContext", "RelayMode", "mode_class", "mode_names", "modes_with_kernel_state"]
