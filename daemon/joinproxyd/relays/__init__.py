"""The relay modes (circuit, nat66, ipip) that carry a pledge's traffic, looked up by name.

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
}


def mode_names() -> list[str]:
    return list(_MODES)


def mode_class(name: str) -> type[RelayMode]:
    module_name, class_name = _MODES[name]
    module = importlib.import_module(f".{module_name}", __name__)
    cls = getattr(module, class_name)
    assert issubclass(cls, RelayMode) and cls.name == name
    return cls


__all__ = ["RelayContext", "RelayMode", "mode_class", "mode_names"]
