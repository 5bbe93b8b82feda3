"""The kernel half of `joinproxyctl trace`: ebpf/trace.bpf.o on skb:kfree_skb, the set of
devices it reports on, its ring buffer, and the names of the kernel's drop reasons.

The names come from the running kernel's BTF (enum skb_drop_reason), never from a table of
ours: each kernel release adds reasons and renumbers none of them only by convention. The
program is loaded and attached by ``DropTracer.open()`` and detached and unloaded by
``close()``; between the two, ``read()`` drains the ring buffer without blocking (its epoll
fd, ``fileno()``, says when there is something to read).
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import ipaddress
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import KernelError, describe_errno
from .bpf import set_watched_devices  # the one module that writes maps
from .bpf_object import DEFAULT_OBJ_DIR
from .libbpf import check, errno_now, libbpf

OBJECT = "trace.bpf.o"
PROGRAM = "jp_trace_drop"
BTF_KIND_ENUM, BTF_KIND_ENUM64 = 6, 19
REASON_PREFIX = "SKB_DROP_REASON_"
HDR = 128
EVENT = struct.Struct(f"<QQIIIHH{HDR}s")  # struct jp_trace_event (ebpf/trace.bpf.c)

_c = ctypes
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "bpf_program__attach": (_c.c_void_p, [_c.c_void_p]),
    "bpf_link__destroy": (_c.c_int, [_c.c_void_p]),
    "ring_buffer__new": (_c.c_void_p, [_c.c_int, _c.c_void_p, _c.c_void_p, _c.c_void_p]),
    "ring_buffer__epoll_fd": (_c.c_int, [_c.c_void_p]),
    "ring_buffer__consume": (_c.c_int, [_c.c_void_p]),
    "ring_buffer__free": (None, [_c.c_void_p]),
    "btf__load_vmlinux_btf": (_c.c_void_p, []),
    "btf__find_by_name_kind": (_c.c_int, [_c.c_void_p, _c.c_char_p, _c.c_uint32]),
    "btf__type_by_id": (_c.c_void_p, [_c.c_void_p, _c.c_uint32]),
    "btf__name_by_offset": (_c.c_char_p, [_c.c_void_p, _c.c_uint32]),
    "btf__free": (None, [_c.c_void_p]),
}
_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


class TraceIfC(ctypes.Structure):
    """struct jp_trace_if: a device, by network namespace inode and ifindex."""

    _fields_ = [("netns", ctypes.c_uint32), ("ifindex", ctypes.c_uint32)]


def _lib() -> Any:
    lib = libbpf()
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib.lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def drop_reason_names() -> dict[int, str]:
    """Value -> name of the running kernel's enum skb_drop_reason (without the
    SKB_DROP_REASON_ prefix), read from /sys/kernel/btf/vmlinux; empty if it has none."""
    lib = _lib()
    btf = lib.lib.btf__load_vmlinux_btf()
    if not btf:
        raise KernelError(f"cannot read the kernel's BTF: {describe_errno(errno_now())}",
                          errno=errno_now())
    try:
        names: dict[int, str] = {}
        for kind in (BTF_KIND_ENUM, BTF_KIND_ENUM64):
            type_id = lib.lib.btf__find_by_name_kind(btf, b"skb_drop_reason", kind)
            if type_id <= 0:
                continue
            ptr = lib.lib.btf__type_by_id(btf, type_id)
            info = ctypes.c_uint32.from_address(ptr + 4).value
            member_size = 8 if kind == BTF_KIND_ENUM else 12  # btf_enum / btf_enum64
            for i in range(info & 0xFFFF):
                entry = ptr + 12 + i * member_size
                name = lib.lib.btf__name_by_offset(btf, ctypes.c_uint32.from_address(entry)
                                                   .value) or b"?"
                if kind == BTF_KIND_ENUM:
                    value = ctypes.c_uint32.from_address(entry + 4).value
                else:
                    value = (ctypes.c_uint32.from_address(entry + 4).value
                             | ctypes.c_uint32.from_address(entry + 8).value << 32)
                names[value] = name.decode().removeprefix(REASON_PREFIX)
            break
        return names
    finally:
        lib.lib.btf__free(btf)


@dataclass
class Packet:
    """What the first bytes of a dropped packet say (addresses as text)."""

    src: str | None = None
    dst: str | None = None
    proto: str | None = None
    sport: int | None = None
    dport: int | None = None
    inner: Packet | None = None
    extra: dict[str, int] = field(default_factory=dict)

    def addresses(self) -> set[str]:
        out = {a for a in (self.src, self.dst) if a}
        if self.inner is not None:
            out |= self.inner.addresses()
        return out

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in (("src", self.src), ("dst", self.dst),
                                                 ("proto", self.proto), ("sport", self.sport),
                                                 ("dport", self.dport)) if v is not None}
        out.update(self.extra)
        if self.inner is not None:
            out["inner"] = self.inner.describe()
        return out


_EXT_HEADERS = {0, 43, 60}  # hop-by-hop, routing, destination options: (len + 1) * 8 bytes
_L4 = {6: "tcp", 17: "udp", 58: "icmpv6", 1: "icmp", 41: "ipv6", 98: "encap"}


def parse_packet(data: bytes, depth: int = 0) -> Packet:
    """Parse an IPv6 (or IPv4) header and what follows, as far as the bytes go; never
    raises (the bytes are whatever the kernel held)."""
    pkt = Packet()
    if len(data) >= 40 and data[0] >> 4 == 6:
        pkt.src = str(ipaddress.IPv6Address(data[8:24]))
        pkt.dst = str(ipaddress.IPv6Address(data[24:40]))
        nh, off = data[6], 40
        while nh in _EXT_HEADERS and off + 8 <= len(data):
            nh, off = data[off], off + (data[off + 1] + 1) * 8
        if nh == 44 and off + 8 <= len(data):  # fragment header
            nh, off = data[off], off + 8
    elif len(data) >= 20 and data[0] >> 4 == 4:
        pkt.src = str(ipaddress.IPv4Address(data[12:16]))
        pkt.dst = str(ipaddress.IPv4Address(data[16:20]))
        nh, off = data[9], (data[0] & 0xF) * 4
    else:
        return pkt
    pkt.proto = _L4.get(nh, str(nh))
    rest = data[off:]
    if nh in (6, 17) and len(rest) >= 4:
        pkt.sport, pkt.dport = struct.unpack("!HH", rest[:4])
    elif nh in (1, 58) and len(rest) >= 2:
        pkt.extra = {"type": rest[0], "code": rest[1]}
    elif nh in (41, 98) and depth == 0:
        pkt.inner = parse_packet(rest, 1)
    return pkt


@dataclass
class Drop:
    reason: int
    ifindex: int
    length: int
    protocol: int
    location: int
    packet: Packet


def decode_event(raw: bytes) -> Drop | None:
    """A ring buffer record as a Drop; None if it is not one (short)."""
    if len(raw) < EVENT.size:
        return None
    _ts, location, reason, ifindex, length, protocol, hdr_len, hdr = EVENT.unpack_from(raw)
    data = hdr[:min(hdr_len, length, HDR)]
    return Drop(reason, ifindex, length, int.from_bytes(protocol.to_bytes(2, "little"), "big"),
                location, parse_packet(data))


class KernelSymbols:
    """Kernel text addresses to function names, from /proc/kallsyms (where a packet was
    freed says more than a reason of NOT_SPECIFIED: veth_xdp_rcv_skb is an XDP drop).
    Without the addresses (kptr_restrict, not root) every lookup is None."""

    def __init__(self, path: str = "/proc/kallsyms") -> None:
        starts: list[int] = []
        names: list[str] = []
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) >= 3 and fields[1] in "tTwW":
                        address = int(fields[0], 16)
                        if address:
                            starts.append(address)
                            names.append(fields[2])
        except OSError:
            pass
        order = sorted(range(len(starts)), key=starts.__getitem__)
        self.starts = [starts[i] for i in order]
        self.names = [names[i] for i in order]

    def name(self, address: int) -> str | None:
        i = bisect.bisect_right(self.starts, address) - 1
        return self.names[i] if i >= 0 and address else None


def netns_inode() -> int:
    """The inode number of this process's network namespace (what ns.inum holds)."""
    return os.stat("/proc/self/ns/net").st_ino


class DropTracer:
    """trace.bpf.o loaded and attached; close() detaches and unloads it."""

    def __init__(self, obj_dir: Path | None = None) -> None:
        lib = _lib()
        path = Path(obj_dir or DEFAULT_OBJ_DIR) / OBJECT
        self._obj: int | None = None
        self._link: int | None = None
        self._ring: int | None = None
        self._pending: list[bytes] = []
        self._callback = _SAMPLE_FN(self._sample)  # referenced while the ring exists
        obj = lib.lib.bpf_object__open_file(str(path).encode(), None)
        if not obj:
            code = errno_now()
            raise KernelError(f"open {path}: {describe_errno(code)} (run 'make -C ebpf')",
                              errno=code)
        self._obj = obj
        try:
            seen = lib.lines_logged
            rc = lib.bpf_object__load(obj)
            if rc < 0:
                raise KernelError(f"load {OBJECT}: {describe_errno(-rc)}\n"
                                  f"{lib.said_since(seen)}", errno=-rc)
            prog = lib.bpf_object__find_program_by_name(obj, PROGRAM.encode())
            ifs = lib.bpf_object__find_map_by_name(obj, b"jp_trace_ifs")
            events = lib.bpf_object__find_map_by_name(obj, b"jp_trace_events")
            if not (prog and ifs and events):
                raise KernelError(f"{OBJECT}: program or maps missing", errno=errno.ENOENT)
            self._ifs_fd = check(lib.bpf_map__fd(ifs), "fd of jp_trace_ifs")
            ring = lib.lib.ring_buffer__new(check(lib.bpf_map__fd(events), "fd of events"),
                                            ctypes.cast(self._callback, ctypes.c_void_p),
                                            None, None)
            if not ring:
                raise KernelError(f"ring buffer: {describe_errno(errno_now())}",
                                  errno=errno_now())
            self._ring = ring
            link = lib.lib.bpf_program__attach(prog)
            if not link:
                code = errno_now()
                raise KernelError(f"attach {PROGRAM} to skb:kfree_skb: "
                                  f"{describe_errno(code)}", errno=code)
            self._link = link
        except BaseException:
            self.close()
            raise

    def _sample(self, _ctx: int | None, data: int, size: int) -> int:
        self._pending.append(ctypes.string_at(data, size))
        return 0

    def watch(self, devices: Iterable[tuple[int, int]]) -> None:
        """Report drops on exactly these (netns inode, ifindex) devices."""
        set_watched_devices(self._ifs_fd, TraceIfC, set(devices))

    def fileno(self) -> int:
        """An fd that is readable when drops are waiting (the ring buffer's epoll fd)."""
        assert self._ring is not None
        return check(libbpf().lib.ring_buffer__epoll_fd(self._ring), "ring buffer epoll fd")

    def read(self) -> list[Drop]:
        """The drops waiting in the ring buffer (does not block)."""
        if self._ring is None:
            return []
        check(libbpf().lib.ring_buffer__consume(self._ring), "ring buffer consume")
        raw, self._pending = self._pending, []
        return [drop for drop in map(decode_event, raw) if drop is not None]

    @property
    def attached(self) -> bool:
        return self._link is not None

    def close(self) -> None:
        lib = libbpf()
        if self._link is not None:
            lib.lib.bpf_link__destroy(self._link)  # detaches from the tracepoint
            self._link = None
        if self._ring is not None:
            lib.lib.ring_buffer__free(self._ring)
            self._ring = None
        if self._obj is not None:
            lib.bpf_object__close(self._obj)
            self._obj = None
