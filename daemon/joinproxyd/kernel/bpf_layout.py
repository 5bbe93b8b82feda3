"""The BPF data plane's shapes, shared with ebpf/joinproxy.h: enums, constants, the ctypes
mirrors of the map keys and values, and which maps and programs each object holds. Changing a
map layout means changing it here and in the header together; tests/test_bpf_structs.py
compares the two (enums by position, structs against the objects' BTF).

Map layouts (who writes each: kernel/bpf.py, the one userspace writer, or the kernel):

    jp_join_cfg    HASH   u32 join ifindex -> jp_join_cfg (registrar LL, outer src/dst,
                          backbone ifindex, ports[4], proto)          written by set_ipip
    jp_ipip_gen    ARRAY  [0] -> generation, bumped after jp_join_cfg changes
                                                                      written by set_ipip
    jp_encap_cache PERCPU_ARRAY [ifindex % 256] -> match, finished Ethernet + outer IPv6
                          header, egress, route MTU                   kernel-written
    jp_bb_addrs    HASH   16-byte outer dst -> u32 join ifindex       written by set_ipip
    jp_registrars  HASH   16-byte outer src -> u32 flags              written by set_ipip
    jp_guard_cfg   ARRAY  [0] -> rate_pps, burst, ports[8], syn_rate_pps, syn_burst
                                                                      written by set_guard
    jp_guard_bkt   LRU    (16-byte source, ifindex, proto) -> tokens, last, drops
                                                                      kernel-written
    jp_guard_next  PROG_ARRAY [0] -> jp_xdp_join, jp_jpy_xdp_join or empty
                                                  written by set_ipip_xdp, set_jpy_xdp
    jp_bare_cfg    ARRAY  [0] -> target ifindex                       written by set_bare_target
    jp_counters    PERCPU_ARRAY jp_prog -> u64 action[Action], drop[DropReason]
                                                                      kernel-written
"""

from __future__ import annotations

import ctypes
import ipaddress
from dataclasses import dataclass
from enum import StrEnum

from ..model import DropReason


# ---------------------------------------------------------------------------- enums -------
class Action(StrEnum):
    """enum jp_action, in the same order (the C value is the position)."""

    PASS = "pass"
    ENCAP = "encap"
    DECAP = "decap"
    ALLOW = "allow"
    FALLBACK = "fallback"
    REDIRECT = "redirect"
    DROP = "drop"
    TOO_BIG = "too-big"


class Program(StrEnum):
    """enum jp_prog, in the same order; the value is the BPF program's name."""

    TC_JOIN = "jp_tc_join"
    TC_BACKBONE = "jp_tc_backbone"
    XDP_JOIN = "jp_xdp_join"
    GUARD = "jp_guard"
    BARE_REDIRECT = "jp_bare_redir"
    BARE_PUSH = "jp_bare_push"
    JPY_JOIN = "jp_jpy_join"
    JPY_BACKBONE = "jp_jpy_backbone"
    JPY_SETKEY = "jp_jpy_setkey"
    BARE_TC = "jp_bare_tc"
    JPY_XDP_JOIN = "jp_jpy_xdp_join"


class JpyCount(StrEnum):
    """enum jp_jpy_count (jpy.bpf.c's jp_jpy_stats), in the same order."""

    UP = "up"
    DOWN = "down"
    FORGED = "forged"
    STALE = "stale"
    TOO_BIG = "too-big"
    MALFORMED = "malformed"
    UNSOLICITED = "unsolicited"
    SEND_ERROR = "send-error"
    REPLAYED = "replayed"


IPIP_PROGRAMS = (Program.TC_JOIN, Program.TC_BACKBONE, Program.XDP_JOIN)
JPY_PROGRAMS = (Program.JPY_JOIN, Program.JPY_BACKBONE, Program.JPY_SETKEY,
                Program.JPY_XDP_JOIN)
OUR_PROGRAM_NAMES = frozenset(p.value for p in Program)
XDP_PROGRAMS = frozenset({Program.XDP_JOIN, Program.GUARD, Program.BARE_REDIRECT,
                          Program.BARE_PUSH, Program.JPY_XDP_JOIN})


# ----------------------------------------------------------- struct mirrors (habit 8) -----
u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
JP_MAX_PORTS = 4
JP_MAX_JOIN_LINKS = 256
JP_ENCAP_SLOTS = 256
JP_ENCAP_HDR = 56
JP_ENCAP_ETH = 2
JP_GUARD_MAX_PORTS = 8
JP_TOKEN_ONE = 1_000_000_000
IPPROTO_IPV6 = 41
IPPROTO_ENCAP = 98


class JoinCfgC(ctypes.Structure):
    _fields_ = [("registrar_ll", u8 * 16), ("outer_src", u8 * 16), ("outer_dst", u8 * 16),
                ("backbone_ifindex", u32), ("ports", u16 * JP_MAX_PORTS), ("proto", u8),
                ("pad", u8 * 3)]


class IpipGenC(ctypes.Structure):
    _fields_ = [("generation", u32)]


class EncapC(ctypes.Structure):
    _fields_ = [("ifindex", u32), ("generation", u32), ("expires", u64), ("backbone", u32),
                ("egress", u32), ("mtu", u32), ("tick", u32), ("ports", u16 * JP_MAX_PORTS),
                ("registrar_ll", u8 * 16), ("hdr", u8 * JP_ENCAP_HDR)]


class AddrC(ctypes.Structure):
    _fields_ = [("addr", u8 * 16)]


class BbAddrC(ctypes.Structure):
    _fields_ = [("join_ifindex", u32)]


class RegistrarC(ctypes.Structure):
    _fields_ = [("flags", u32)]


class GuardCfgC(ctypes.Structure):
    _fields_ = [("rate_pps", u64), ("burst", u64), ("ports", u16 * JP_GUARD_MAX_PORTS),
                ("syn_rate_pps", u64), ("syn_burst", u64)]


class GuardKeyC(ctypes.Structure):
    _fields_ = [("addr", u8 * 16), ("ifindex", u32), ("proto", u8), ("pad", u8 * 3)]


class GuardBucketC(ctypes.Structure):
    _fields_ = [("tokens", u64), ("last_ns", u64), ("drops", u64)]


class BareCfgC(ctypes.Structure):
    _fields_ = [("ifindex", u32)]


JP_JPY_MAX_CONTENT = 1194


class JpyCfgC(ctypes.Structure):
    _fields_ = [("backbone_addr", u8 * 16), ("registrar_addr", u8 * 16),
                ("backbone_ifindex", u32), ("current_slot", u32), ("src_port", u16),
                ("registrar_port", u16), ("max_content", u16), ("pad", u16)]


class JpyLinkC(ctypes.Structure):
    _fields_ = [("addr", u8 * 16), ("port", u16), ("relay", u8), ("pad", u8)]


class JpyStatsC(ctypes.Structure):
    _fields_ = [("n", u64 * len(JpyCount)), ("bytes_up", u64), ("bytes_down", u64),
                ("xdp_up", u64)]


class JpyWhoC(ctypes.Structure):
    _fields_ = [("addr", u8 * 16), ("ifindex", u32), ("port", u16), ("pad", u16),
                ("seq", u64)]


class JpyKeyArgsC(ctypes.Structure):
    """jp_jpy_setkey's context (jpy.bpf.c struct jp_jpy_key_args)."""

    _fields_ = [("slot", u32), ("key_id", u32), ("key", u8 * 32), ("result", ctypes.c_int32)]


class CountersC(ctypes.Structure):
    _fields_ = [("action", u64 * len(Action)), ("drop", u64 * len(DropReason))]


# C struct name -> mirror; tests compare each against the BTF of the objects.
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "jp_join_cfg": JoinCfgC, "jp_ipip_gen": IpipGenC, "jp_encap": EncapC, "jp_addr": AddrC,
    "jp_bb_addr": BbAddrC,
    "jp_registrar": RegistrarC, "jp_guard_cfg": GuardCfgC, "jp_guard_key": GuardKeyC,
    "jp_guard_bucket": GuardBucketC, "jp_bare_cfg": BareCfgC, "jp_counters": CountersC,
    "jp_jpy_cfg": JpyCfgC, "jp_jpy_link": JpyLinkC, "jp_jpy_stats": JpyStatsC,
    "jp_jpy_key_args": JpyKeyArgsC, "jp_jpy_who": JpyWhoC,
}


@dataclass(frozen=True)
class ObjectSpec:
    file: str
    programs: tuple[Program, ...]
    maps: tuple[str, ...]
    # False: the maps stay private to the process (the programs are still pinned, so a
    # restart finds its predecessor's): nothing in them outlives a run (jpy: fresh keys,
    # configuration written at start), and daemons in other namespaces never share them.
    pin_maps: bool = True


OBJECTS: dict[str, ObjectSpec] = {
    "ipip": ObjectSpec("ipip.bpf.o", IPIP_PROGRAMS,
                       ("jp_counters", "jp_join_cfg", "jp_bb_addrs", "jp_registrars",
                        "jp_ipip_gen", "jp_encap_cache")),
    "guard": ObjectSpec("guard.bpf.o", (Program.GUARD,),
                        ("jp_counters", "jp_guard_cfg", "jp_guard_bkt", "jp_guard_next")),
    "bare": ObjectSpec("bare_redirect.bpf.o",
                       (Program.BARE_REDIRECT, Program.BARE_PUSH, Program.BARE_TC),
                       ("jp_counters", "jp_bare_cfg")),
    # Optional: needs the BPF crypto kfuncs (Linux 6.10+); without them the jpy relay runs
    # in user space (datapath.py loads it apart, so its failure costs nothing else).
    "jpy": ObjectSpec("jpy.bpf.o", JPY_PROGRAMS,
                      ("jp_counters", "jp_jpy_keys", "jp_jpy_cfg", "jp_jpy_links",
                       "jp_jpy_stats", "jp_jpy_scratch", "jp_jpy_replays",
                       "jp_jpy_last", "jp_jpy_xdp_scratch"), pin_maps=False),
}


# ---------------------------------------------------------- configuration mirrors ---------
def unicast_ipv6(text: str, what: str) -> ipaddress.IPv6Address:
    try:
        addr = ipaddress.IPv6Address(text.split("%")[0])
    except ValueError as exc:
        raise ValueError(f"{what}: not an IPv6 address: {text!r}") from exc
    if addr.is_multicast or addr.is_unspecified:
        raise ValueError(f"{what}: must be a unicast address (got {text})")
    return addr


@dataclass(frozen=True)
class IpipJoin:
    """How one join link is relayed by IPIP (protocols.md §7).

    registrar_ll      the link-local address announced to pledges (the GRASP locator); the
                      proxy must answer neighbour solicitations for it on the join link
    outer_src         the proxy's backbone address for this join link; unique per link (it
                      is how a reply finds its link) and configured on the backbone interface
    registrar         the registrar's backbone (ACP) address, the outer destination
    backbone_ifindex  where encapsulated packets leave
    ports             TCP/UDP destination ports relayed (1 to 4)
    proto             outer next header: 41 (IPv6-in-IPv6, default) or 98 (ENCAP)
    """

    registrar_ll: str
    outer_src: str
    registrar: str
    backbone_ifindex: int
    ports: tuple[int, ...]
    proto: int = IPPROTO_IPV6

    def __post_init__(self) -> None:
        if not unicast_ipv6(self.registrar_ll, "registrar_ll").is_link_local:
            raise ValueError(f"registrar_ll: must be link-local (got {self.registrar_ll})")
        unicast_ipv6(self.outer_src, "outer_src")
        unicast_ipv6(self.registrar, "registrar")
        if self.proto not in (IPPROTO_IPV6, IPPROTO_ENCAP):
            raise ValueError(f"proto: must be 41 or 98 (got {self.proto})")
        if not 1 <= len(self.ports) <= JP_MAX_PORTS:
            raise ValueError(f"ports: 1 to {JP_MAX_PORTS} ports (got {len(self.ports)})")
        if any(not 1 <= p <= 65535 for p in self.ports):
            raise ValueError(f"ports: each between 1 and 65535 (got {list(self.ports)})")
        if self.backbone_ifindex <= 0:
            raise ValueError(f"backbone_ifindex: must be positive (got {self.backbone_ifindex})")

    def to_c(self) -> JoinCfgC:
        cfg = JoinCfgC()
        cfg.registrar_ll[:] = unicast_ipv6(self.registrar_ll, "registrar_ll").packed
        cfg.outer_src[:] = unicast_ipv6(self.outer_src, "outer_src").packed
        cfg.outer_dst[:] = unicast_ipv6(self.registrar, "registrar").packed
        cfg.backbone_ifindex = self.backbone_ifindex
        for i, port in enumerate(self.ports):
            cfg.ports[i] = port
        cfg.proto = self.proto
        return cfg


def addr_key(text: str) -> AddrC:
    key = AddrC()
    key.addr[:] = ipaddress.IPv6Address(text.split("%")[0]).packed
    return key
