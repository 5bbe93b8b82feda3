"""[ipip] datapath = "auto" | "bpf" | "kernel" (issue 19 item 3): the key, the choice, and
what this machine kind's kernel (no ip6ip6 tunnels) says. The tunnel path itself runs in
Debian's stock kernel under QEMU: tests/test_vm_stock_kernel.py (make test-vm)."""

from __future__ import annotations

import pytest

from joinproxyd.config import ConfigError, parse
from joinproxyd.kernel import ip6tnl
from joinproxyd.relays.ipip import choose_datapath

MINIMAL = {"backbone": {"interface": "bb0"},
           "join": [{"interfaces": ["join*"], "modes": ["ipip"]}],
           "ipip": {"backbone_prefix": "fd00:99::/112"}}


def ipip(**keys: object) -> dict[str, object]:
    return {**MINIMAL, "ipip": {**MINIMAL["ipip"], **keys}}  # type: ignore[dict-item]


def test_the_default_is_auto() -> None:
    assert parse(MINIMAL).ipip.datapath == "auto"
    assert parse(ipip(datapath="kernel")).ipip.datapath == "kernel"


@pytest.mark.parametrize(("value", "message"), [
    ("tunnel", "ipip.datapath: must be \"auto\", \"bpf\" or \"kernel\" (got 'tunnel')"),
    (True, "ipip.datapath: must be \"auto\", \"bpf\" or \"kernel\" (got True)"),
])
def test_bad_values_name_the_key(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(ipip(datapath=value))
    assert str(info.value) == message


def test_protocol_98_cannot_go_through_a_kernel_tunnel() -> None:
    with pytest.raises(ConfigError) as info:
        parse(ipip(datapath="kernel", protocol=98))
    assert str(info.value) == ('ipip.datapath: "kernel" (ip6ip6 tunnels) carries protocol 41 '
                               'only; ipip.protocol = 98 needs "bpf" or "auto"')
    assert parse(ipip(datapath="auto", protocol=98)).ipip.datapath == "auto"


NO_BPF, NO_TUNNEL = "EPERM (no BPF)", "the kernel has no ip6ip6 tunnels"


@pytest.mark.parametrize(("setting", "protocol", "bpf", "tunnel", "path"), [
    ("bpf", 41, None, None, "bpf"),
    ("bpf", 41, NO_BPF, None, "bpf"),  # asked for: its errors are what the operator sees
    ("kernel", 41, None, None, "kernel"),
    ("kernel", 41, None, NO_TUNNEL, None),
    ("auto", 41, None, None, "bpf"),  # BPF preferred where it runs
    ("auto", 98, None, NO_TUNNEL, "bpf"),
    ("auto", 41, NO_BPF, None, "kernel"),
    ("auto", 98, NO_BPF, None, None),  # protocol 98 needs BPF
    ("auto", 41, NO_BPF, NO_TUNNEL, None),
])
def test_the_choice(setting: str, protocol: int, bpf: str | None, tunnel: str | None,
                    path: str | None) -> None:
    chosen, why = choose_datapath(setting, protocol, bpf, tunnel)
    assert chosen == path, why
    if path is None:
        assert (NO_TUNNEL in why) or ("protocol 98 needs BPF" in why), why


def test_this_kernel_has_no_tunnels_and_says_so(as_root: None) -> None:
    """platform.md: no ip6tnl here. The probe names the reason and leaves no link behind."""
    problem = ip6tnl.probe()
    assert problem is not None and problem.startswith("the kernel has no ip6ip6 tunnels (")
    assert ip6tnl.ours() == []


def test_u32_keys_match_address_protocol_and_port() -> None:
    keys = ip6tnl._u32_keys("fe80::2", 8443)
    assert keys == ["0xfe800000/0xffffffff+24", "0x00000000/0xffffffff+28",
                    "0x00000000/0xffffffff+32", "0x00000002/0xffffffff+36",
                    "0x000020fb/0x0000ffff+40"]
    assert ip6tnl._proto_key(17) == "0x00001100/0x0000ff00+4"
