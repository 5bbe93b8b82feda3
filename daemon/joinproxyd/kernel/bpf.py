"""The BPF data plane's one owner: loads the objects, attaches the programs, writes every map
that userspace writes and reads every counter (habits 7 and 10).

Objects (built by ``make -C ebpf``, never compiled here; shared structs in ebpf/joinproxy.h):

    ipip.bpf.o           jp_tc_join      tc ingress of a join link: IPv6-in-IPv6 encapsulation
                         jp_tc_backbone  tc ingress of the backbone: decapsulation
                         jp_xdp_join     XDP encapsulation (fast path, falls back to tc)
    guard.bpf.o          jp_guard        XDP join-port guard (per-source token bucket)
    bare_redirect.bpf.o  jp_bare_redir   benchmark baseline / counting sink
                         jp_bare_push    benchmark floor: 40 bytes pushed, then redirected

Use from the control plane::

    dp = BpfDatapath.open()                     # objects from ebpf/, maps pinned in
                                                # /sys/fs/bpf/joinproxyd (bpffs mounted if need be)
    dp.set_guard(rate_pps=20, burst=40, ports=[443, 5684])
    dp.attach_guard("join0")                    # every join link, whatever its modes
    dp.set_ipip({join0_index: IpipJoin(registrar_ll="fe80::1234", outer_src="fd4a:5044::1:1",
                                       registrar="fd4a:5044::100", backbone_ifindex=bb_index,
                                       ports=(443,))})
    dp.attach_ipip_join("join0"); dp.attach_ipip_backbone("bb0")
    dp.set_ipip_xdp(True)                       # optional XDP fast path behind the guard
    dp.detach_stale()                           # once, after the first full reconcile
    dp.counters(); dp.drops(); dp.kernel_drops(IPIP_PROGRAMS)   # at scrape time, thread-safe
    dp.close(detach=True, unpin=True)           # SIGTERM; close(detach=False) leaves it running

Lifecycle (habit 10): open every object, check every expected map and program by name (a
missing one fails with its name), adopt or replace pinned maps, load (a verifier failure
carries libbpf's log), pin the programs, then attach when asked. Attaching replaces whatever
joinproxyd program sits on that hook, ours or left by a killed daemon, so each hook holds
exactly one of ours; a foreign program on an XDP hook is refused (EBUSY), never replaced.
Ours means: a program this process loaded, one a previous daemon pinned in ``pin_dir``
(prog_<name>; the daemon's unit has no CAP_SYS_ADMIN, without which the kernel names no
program by id), or, when the kernel does answer, one named like ours; tc filters carry the
name "<program>:<id>". close() detaches only what this process attached; ``detach_stale()``
removes our programs from hooks this process did not attach (a killed daemon's leftovers).
A clsact qdisc is added where a tc program needs one and none is there, claimed first in
``qdisc_record`` (qdisc_record.py) so that a run after kill -9 knows it for ours; ours are
removed once no filter of anyone's is left on them, a clsact that was there before never.
Maps are pinned under ``pin_dir`` so a restarted daemon adopts them (configuration, guard
buckets and counters survive, and programs left attached keep working until replaced); a
pinned map whose type or sizes no longer match the object is replaced, with a log line.

Privileges: CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (the unit's set) load, pin, attach and
read everything; ``pin_dir`` must exist and be the daemon user's, and its parent must let that
user pass (bpffs is usually mounted 0700 root). Mounting bpffs on /sys/fs/bpf when nothing did
needs CAP_SYS_ADMIN and the mount syscalls.

Map layouts (ebpf/joinproxy.h; ctypes mirrors below, checked against the objects' BTF):

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
    jp_guard_next  PROG_ARRAY [0] -> jp_xdp_join or empty             written by set_ipip_xdp
    jp_bare_cfg    ARRAY  [0] -> target ifindex                       written by set_bare_target
    jp_counters    PERCPU_ARRAY jp_prog -> u64 action[Action], drop[DropReason]
                                                                      kernel-written

Threads: map access is plain syscalls, safe from any thread (counters() is called from the
metrics thread). Netlink runs on one private worker thread, because pyroute2's synchronous
IPRoute cannot run inside a running asyncio loop; the attach/detach calls block for a few
milliseconds, so the daemon may call them through ``asyncio.to_thread``.

``test_run`` and ``bench_run`` use BPF_PROG_TEST_RUN (tests, bench/ipip_pps.py); an
``ifindex`` given to them is looked up in the calling thread's network namespace.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from ..model import DropReason
from . import KernelError, describe_errno, features
from .qdisc_record import QdiscRecord

log = logging.getLogger(__name__)

# Where the objects are: `make -C ebpf` leaves them in the checkout's ebpf/; the .ipk puts
# them beside its python/ directory (/usr/lib/joinproxyd/bpf), the .deb in that same place
# while its code is under /usr/lib/brski. The first that exists; a configured
# daemon.bpf_object_dir overrides. Then the daemon's pin directory.
_TOP = Path(__file__).resolve().parents[3]
OBJ_DIRS = (_TOP / "ebpf", _TOP / "bpf", Path("/usr/lib/joinproxyd/bpf"))
DEFAULT_OBJ_DIR = next((d for d in OBJ_DIRS if d.is_dir()), OBJ_DIRS[0])
BPFFS_ROOT = Path("/sys/fs/bpf")
DEFAULT_PIN_DIR = BPFFS_ROOT / "joinproxyd"


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


IPIP_PROGRAMS = (Program.TC_JOIN, Program.TC_BACKBONE, Program.XDP_JOIN)
OUR_PROGRAM_NAMES = frozenset(p.value for p in Program)
XDP_PROGRAMS = frozenset({Program.XDP_JOIN, Program.GUARD, Program.BARE_REDIRECT,
                          Program.BARE_PUSH})


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
                ("egress", u32), ("mtu", u32), ("pad", u32), ("ports", u16 * JP_MAX_PORTS),
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


class CountersC(ctypes.Structure):
    _fields_ = [("action", u64 * len(Action)), ("drop", u64 * len(DropReason))]


# C struct name -> mirror; tests compare each against the BTF of the objects.
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "jp_join_cfg": JoinCfgC, "jp_ipip_gen": IpipGenC, "jp_encap": EncapC, "jp_addr": AddrC,
    "jp_bb_addr": BbAddrC,
    "jp_registrar": RegistrarC, "jp_guard_cfg": GuardCfgC, "jp_guard_key": GuardKeyC,
    "jp_guard_bucket": GuardBucketC, "jp_bare_cfg": BareCfgC, "jp_counters": CountersC,
}


@dataclass(frozen=True)
class ObjectSpec:
    file: str
    programs: tuple[Program, ...]
    maps: tuple[str, ...]


OBJECTS: dict[str, ObjectSpec] = {
    "ipip": ObjectSpec("ipip.bpf.o", IPIP_PROGRAMS,
                       ("jp_counters", "jp_join_cfg", "jp_bb_addrs", "jp_registrars",
                        "jp_ipip_gen", "jp_encap_cache")),
    "guard": ObjectSpec("guard.bpf.o", (Program.GUARD,),
                        ("jp_counters", "jp_guard_cfg", "jp_guard_bkt", "jp_guard_next")),
    "bare": ObjectSpec("bare_redirect.bpf.o", (Program.BARE_REDIRECT, Program.BARE_PUSH),
                       ("jp_counters", "jp_bare_cfg")),
}


# --------------------------------------------------------------------- config types -------
def _ipv6(text: str, what: str) -> ipaddress.IPv6Address:
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
        if not _ipv6(self.registrar_ll, "registrar_ll").is_link_local:
            raise ValueError(f"registrar_ll: must be link-local (got {self.registrar_ll})")
        _ipv6(self.outer_src, "outer_src")
        _ipv6(self.registrar, "registrar")
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
        cfg.registrar_ll[:] = _ipv6(self.registrar_ll, "registrar_ll").packed
        cfg.outer_src[:] = _ipv6(self.outer_src, "outer_src").packed
        cfg.outer_dst[:] = _ipv6(self.registrar, "registrar").packed
        cfg.backbone_ifindex = self.backbone_ifindex
        for i, port in enumerate(self.ports):
            cfg.ports[i] = port
        cfg.proto = self.proto
        return cfg


def _addr_key(text: str) -> AddrC:
    key = AddrC()
    key.addr[:] = ipaddress.IPv6Address(text.split("%")[0]).packed
    return key


# ------------------------------------------------------------------- libbpf (ctypes) ------
_c = ctypes
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "bpf_object__open_file": (_c.c_void_p, [_c.c_char_p, _c.c_void_p]),
    "bpf_object__load": (_c.c_int, [_c.c_void_p]),
    "bpf_object__close": (None, [_c.c_void_p]),
    "bpf_object__find_program_by_name": (_c.c_void_p, [_c.c_void_p, _c.c_char_p]),
    "bpf_object__find_map_by_name": (_c.c_void_p, [_c.c_void_p, _c.c_char_p]),
    "bpf_program__fd": (_c.c_int, [_c.c_void_p]),
    "bpf_map__fd": (_c.c_int, [_c.c_void_p]),
    "bpf_map__set_pin_path": (_c.c_int, [_c.c_void_p, _c.c_char_p]),
    "bpf_map__type": (_c.c_int, [_c.c_void_p]),
    "bpf_map__key_size": (_c.c_uint32, [_c.c_void_p]),
    "bpf_map__value_size": (_c.c_uint32, [_c.c_void_p]),
    "bpf_map__max_entries": (_c.c_uint32, [_c.c_void_p]),
    "bpf_map__map_flags": (_c.c_uint32, [_c.c_void_p]),
    "bpf_map_update_elem": (_c.c_int, [_c.c_int, _c.c_void_p, _c.c_void_p, _c.c_uint64]),
    "bpf_map_lookup_elem": (_c.c_int, [_c.c_int, _c.c_void_p, _c.c_void_p]),
    "bpf_map_delete_elem": (_c.c_int, [_c.c_int, _c.c_void_p]),
    "bpf_map_get_next_key": (_c.c_int, [_c.c_int, _c.c_void_p, _c.c_void_p]),
    "bpf_prog_test_run_opts": (_c.c_int, [_c.c_int, _c.c_void_p]),
    "bpf_obj_get": (_c.c_int, [_c.c_char_p]),
    "bpf_obj_pin": (_c.c_int, [_c.c_int, _c.c_char_p]),
    "bpf_prog_get_fd_by_id": (_c.c_int, [_c.c_uint32]),
    "bpf_obj_get_info_by_fd": (_c.c_int, [_c.c_int, _c.c_void_p, _c.POINTER(_c.c_uint32)]),
    "libbpf_num_possible_cpus": (_c.c_int, []),
    "libbpf_set_print": (_c.c_void_p, [_c.c_void_p]),
}

BPF_ANY, BPF_NOEXIST = 0, 1
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
LIBBPF_WARN = 0
# libbpf's messages, newest last: a failed load quotes the tail (it holds the verifier log).
_LIBBPF_TAIL: collections.deque[str] = collections.deque(maxlen=400)


class TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf 1.1)."""

    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p),
                ("data_out", ctypes.c_void_p), ("data_size_in", u32), ("data_size_out", u32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
                ("ctx_size_in", u32), ("ctx_size_out", u32), ("retval", u32),
                ("repeat", ctypes.c_int), ("duration", u32), ("flags", u32), ("cpu", u32),
                ("batch_size", u32)]


class XdpMdC(ctypes.Structure):
    """struct xdp_md, the XDP test-run context."""

    _fields_ = [("data", u32), ("data_end", u32), ("data_meta", u32),
                ("ingress_ifindex", u32), ("rx_queue_index", u32), ("egress_ifindex", u32)]


SKB_CTX_IFINDEX_OFFSET = 40  # offsetof(struct __sk_buff, ifindex); the UAPI is stable
SKB_CTX_SIZE = SKB_CTX_IFINDEX_OFFSET + 4  # the kernel zero-fills the rest


class _Libbpf:
    """libbpf.so.1, with the few functions this module uses typed."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
            self.libc = ctypes.CDLL(None, use_errno=True)
        except OSError as exc:
            # named in the words of the package system that installed us (kernel/features.py)
            raise KernelError(f"cannot load libbpf.so.1 ({exc}); "
                              f"{features.install_hint('libbpf')}",
                              errno=errno.ENOENT) from exc
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        self.libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                                        ctypes.c_void_p]
        self.libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        self.lines_logged = 0
        # Kept referenced: libbpf calls it for as long as the process lives.
        self._printer = _PRINT_FN(self._print)
        self.lib.libbpf_set_print(ctypes.cast(self._printer, ctypes.c_void_p))
        self.ncpus = self.lib.libbpf_num_possible_cpus()
        if self.ncpus <= 0:
            raise KernelError("libbpf cannot count the possible CPUs", errno=-self.ncpus)

    def _print(self, level: int, fmt: bytes, args: int | None) -> int:
        # va_list is passed on as the pointer it is (x86-64, aarch64 ABIs).
        buf = ctypes.create_string_buffer(2048)
        self.libc.vsnprintf(buf, len(buf), fmt, args)
        text = buf.value.decode(errors="replace").rstrip("\n")
        for line in text.splitlines() or [""]:
            _LIBBPF_TAIL.append(line)
            self.lines_logged += 1
            log.debug("libbpf: %s", line)
        return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lib, name)


_LIB: _Libbpf | None = None
_LIB_LOCK = threading.Lock()


def libbpf() -> _Libbpf:
    global _LIB
    with _LIB_LOCK:
        if _LIB is None:
            _LIB = _Libbpf()
        return _LIB


def _check(rc: int, what: str) -> int:
    """libbpf 1.x returns -errno from int functions."""
    if rc < 0:
        raise KernelError(f"{what}: {describe_errno(-rc)}", errno=-rc)
    return rc


def _errno_now() -> int:
    return ctypes.get_errno() or errno.EINVAL


# ------------------------------------------------------------- kernel object info ---------
def _info(fd: int) -> bytes:
    """bpf_obj_get_info_by_fd into a zeroed buffer (larger than both info structs: the
    kernel accepts a longer buffer whose tail is zero and writes no pointer field left 0)."""
    buf = ctypes.create_string_buffer(256)
    size = ctypes.c_uint32(len(buf))
    _check(libbpf().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)), "bpf_obj_get_info")
    return buf.raw


def prog_name_by_id(prog_id: int) -> str | None:
    """The kernel's name of a loaded program (bpf_prog_info.name); None if it is gone or this
    process may not ask (BPF_PROG_GET_FD_BY_ID needs CAP_SYS_ADMIN, which the daemon's unit
    does not grant: hence the pinned programs, see _Object._pin_programs)."""
    fd = libbpf().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        return _info(fd)[64:80].split(b"\0")[0].decode(errors="replace")
    finally:
        os.close(fd)


def prog_id_of_fd(fd: int) -> int:
    return int.from_bytes(_info(fd)[4:8], "little")


@dataclass(frozen=True)
class _MapShape:
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


def _pinned_shape(path: Path) -> _MapShape | None:
    """Shape of the map pinned at path; None if nothing usable is pinned there."""
    fd = libbpf().bpf_obj_get(str(path).encode())
    if fd < 0:
        return None
    try:
        raw = _info(fd)
    except KernelError:
        return None  # pinned, but not a map
    finally:
        os.close(fd)
    f = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 24, 4)]
    return _MapShape(f[0], f[2], f[3], f[4], f[5])


# ------------------------------------------------------------------ bpffs -----------------
BPF_FS_TYPE = "bpf"


def _fs_type(path: Path) -> str | None:
    """The filesystem type of the mount holding path (longest mount point prefix)."""
    target = os.path.realpath(path)
    best, fstype = "", None
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mount_point = left.split()[4].replace("\\040", " ")
            if (target == mount_point or target.startswith(mount_point.rstrip("/") + "/")) \
                    and len(mount_point) >= len(best):
                best, fstype = mount_point, right.split()[0]
    return fstype


def ensure_pin_dir(pin_dir: Path) -> None:
    """Make pin_dir, on a bpf filesystem. /sys/fs/bpf is mounted if it is not bpffs (no init
    system did it); any other parent must already be bpffs (tests mount their own)."""
    parent = pin_dir.parent
    if _fs_type(parent) != BPF_FS_TYPE:
        if os.path.realpath(parent) != str(BPFFS_ROOT):
            raise KernelError(f"{parent} is not on a bpf filesystem (mount -t bpf bpf DIR)",
                              errno=errno.ENOTDIR)
        lib = libbpf()
        if lib.libc.mount(b"bpf", str(BPFFS_ROOT).encode(), b"bpf", 0, b"mode=0700") != 0:
            code = _errno_now()
            raise KernelError(f"mount -t bpf {BPFFS_ROOT}: {describe_errno(code)}", errno=code)
        log.info("mounted a bpf filesystem on %s", BPFFS_ROOT)
    try:
        pin_dir.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise KernelError(f"mkdir {pin_dir}: {describe_errno(exc.errno or 0)}",
                          errno=exc.errno) from exc


# ------------------------------------------------------------------ loaded object ---------
class _Object:
    """One loaded bpf_object: its programs' and maps' fds by name."""

    def __init__(self, name: str, spec: ObjectSpec, path: Path, pin_dir: Path | None) -> None:
        lib = libbpf()
        self.name, self.spec = name, spec
        self.progs: dict[Program, int] = {}
        self.maps: dict[str, int] = {}
        self.pins: list[Path] = []
        # programs a previous daemon pinned here: prog id -> an fd we hold on them
        self.previous: dict[int, int] = {}
        self._obj = lib.bpf_object__open_file(str(path).encode(), None)
        if not self._obj:
            code = _errno_now()
            raise KernelError(f"open {path}: {describe_errno(code)} (run 'make -C ebpf')",
                              errno=code)
        try:
            self._load(path, pin_dir)
        except BaseException:
            self.close()
            raise

    def _load(self, path: Path, pin_dir: Path | None) -> None:
        lib = libbpf()
        handles = {}
        for map_name in self.spec.maps:
            handle = lib.bpf_object__find_map_by_name(self._obj, map_name.encode())
            if not handle:
                raise KernelError(f"{path.name}: map {map_name} not found", errno=errno.ENOENT)
            handles[map_name] = handle
        progs = {}
        for prog in self.spec.programs:
            handle = lib.bpf_object__find_program_by_name(self._obj, prog.value.encode())
            if not handle:
                raise KernelError(f"{path.name}: program {prog} not found", errno=errno.ENOENT)
            progs[prog] = handle
        # The counters' layout follows the enums; a header and a model that disagree would
        # misread every counter, so refuse to start (tests/test_bpf_structs.py says which).
        size = lib.bpf_map__value_size(handles["jp_counters"])
        if size != ctypes.sizeof(CountersC):
            raise KernelError(f"{path.name}: jp_counters values are {size} bytes, joinproxyd "
                              f"expects {ctypes.sizeof(CountersC)}: ebpf/joinproxy.h and the "
                              "Python enums (DropReason, Action) disagree", errno=errno.EPROTO)
        if pin_dir is not None:
            for map_name, handle in handles.items():
                pin = pin_dir / map_name
                self._adopt_or_replace(pin, handle)
                _check(lib.bpf_map__set_pin_path(handle, str(pin).encode()),
                       f"{path.name}: pin path for {map_name}")
                self.pins.append(pin)
        # No rodata constants: everything the control plane sets lives in maps, so it can
        # change without a reload.
        seen = lib.lines_logged
        rc = lib.bpf_object__load(self._obj)
        if rc < 0:
            # the end of what libbpf said meanwhile: it holds the verifier's complaint
            new = min(lib.lines_logged - seen, len(_LIBBPF_TAIL), 40)
            detail = "\n".join(list(_LIBBPF_TAIL)[len(_LIBBPF_TAIL) - new:])
            raise KernelError(f"load {path.name}: {describe_errno(-rc)}\n{detail}", errno=-rc)
        for map_name, handle in handles.items():
            self.maps[map_name] = _check(lib.bpf_map__fd(handle), f"fd of map {map_name}")
        for prog, handle in progs.items():
            self.progs[prog] = _check(lib.bpf_program__fd(handle), f"fd of program {prog}")
        if pin_dir is not None:
            self._pin_programs(pin_dir)

    def _pin_programs(self, pin_dir: Path) -> None:
        """Pin each program as prog_<name>, after taking an fd on the one a previous daemon
        pinned there. A restarted daemon so knows its predecessor's programs by id, and holds
        the fds an atomic replace on a hook needs, with no privilege beyond the files' owner
        (asking the kernel for a program by id needs CAP_SYS_ADMIN)."""
        lib = libbpf()
        for prog, fd in self.progs.items():
            pin = pin_dir / f"prog_{prog.value}"
            if os.path.lexists(pin):
                old = lib.bpf_obj_get(str(pin).encode())
                if old >= 0:
                    info = _info(old)
                    if info[64:80].split(b"\0")[0].decode(errors="replace") == prog.value:
                        self.previous[int.from_bytes(info[4:8], "little")] = old
                    else:
                        os.close(old)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(pin)
            _check(lib.bpf_obj_pin(fd, str(pin).encode()), f"pin {pin}")
            self.pins.append(pin)

    def _adopt_or_replace(self, pin: Path, handle: int) -> None:
        """Keep a pinned map libbpf can reuse; remove one it would refuse (another build's)."""
        if not os.path.lexists(pin):
            return
        lib = libbpf()
        want = _MapShape(lib.bpf_map__type(handle), lib.bpf_map__key_size(handle),
                         lib.bpf_map__value_size(handle), lib.bpf_map__max_entries(handle),
                         lib.bpf_map__map_flags(handle))
        have = _pinned_shape(pin)
        if have == want:
            log.debug("adopting pinned map %s", pin)
            return
        log.warning("replacing stale pinned map %s (pinned %s, object wants %s)", pin, have, want)
        try:
            os.unlink(pin)
        except OSError as exc:
            raise KernelError(f"unlink {pin}: {describe_errno(exc.errno or 0)}",
                              errno=exc.errno) from exc

    def close(self) -> None:
        for fd in self.previous.values():
            os.close(fd)
        self.previous.clear()
        if self._obj:
            libbpf().bpf_object__close(self._obj)  # closes every fd above
            self._obj = None
            self.progs.clear()
            self.maps.clear()


# ------------------------------------------------------------------ map helpers -----------

def _update(fd: int, key: Any, value: Any, what: str, flags: int = BPF_ANY) -> None:
    _check(libbpf().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), flags),
           f"update {what}")


def _lookup(fd: int, key: Any, value: Any) -> bool:
    rc = libbpf().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
    if rc == -errno.ENOENT:
        return False
    _check(rc, "map lookup")
    return True


def _delete(fd: int, key: Any, what: str) -> bool:
    rc = libbpf().bpf_map_delete_elem(fd, ctypes.byref(key))
    if rc == -errno.ENOENT:
        return False
    _check(rc, f"delete {what}")
    return True


def _keys(fd: int, key_type: type[Any]) -> list[Any]:
    lib = libbpf()
    keys: list[Any] = []
    prev: Any = None
    while True:
        nxt = key_type()
        rc = lib.bpf_map_get_next_key(fd, ctypes.byref(prev) if prev is not None else None,
                                      ctypes.byref(nxt))
        if rc == -errno.ENOENT:
            return keys
        _check(rc, "map iteration")
        keys.append(nxt)
        prev = nxt


# ------------------------------------------------------------------ netlink ---------------
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4
TC_H_INGRESS_PARENT = 0xFFFFFFF2  # clsact ingress, ffff:fff2
TC_H_EGRESS_PARENT = 0xFFFFFFF3
ETH_P_ALL = 0x0003
# One fixed tc preference per program, so "replace" is atomic and two of our programs on
# one link (a link both join and backbone, in a lab) do not fight over a slot.
TC_PREF = {Program.TC_JOIN: 0x4A01, Program.TC_BACKBONE: 0x4A02}
TC_HANDLE = 1

T = TypeVar("T")


@dataclass(frozen=True)
class Hook:
    """Where one of our programs is attached: kind "xdp" (one program per link) or
    "tc-ingress" (one per program and link: a lab link may be join and backbone at once)."""

    kind: str
    ifindex: int
    program: str


@dataclass
class _Attached:
    program: Program
    mode: str  # "native" | "generic" for XDP, "ingress" for tc


def _nl_error(exc: Exception, what: str) -> KernelError:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 0:
        return KernelError(f"{what}: {describe_errno(code)}", errno=code)
    return KernelError(f"{what}: {exc}")


class _Netlink:
    """pyroute2 on one worker thread (IPRoute cannot run inside a running asyncio loop)."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jp-bpf-netlink")
        self._ipr: Any = None

    def run(self, fn: Callable[[Any], T]) -> T:
        def call() -> T:
            from pyroute2 import IPRoute  # imported lazily: only attach needs it
            from pyroute2.netlink.exceptions import NetlinkError

            if self._ipr is None:
                self._ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()
            try:
                return fn(self._ipr)
            except (NetlinkError, KernelError):
                raise  # the kernel said no; the socket is fine
            except Exception:
                # pyroute2 keeps a failed socket failed: start afresh next time
                with contextlib.suppress(Exception):
                    self._ipr.close()
                self._ipr = None
                raise

        return self._pool.submit(call).result()

    def close(self) -> None:
        def shut() -> None:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None

        self._pool.submit(shut).result()
        self._pool.shutdown(wait=True)


def _xdp_ids(ipr: Any, ifindex: int) -> dict[str, int]:
    """{"native": id, "generic": id} of the XDP programs on a link."""
    link = ipr.link("get", index=ifindex)[0]
    xdp = link.get_attr("IFLA_XDP")
    ids = {}
    if xdp is not None:
        for attr, mode in (("IFLA_XDP_DRV_PROG_ID", "native"),
                           ("IFLA_XDP_SKB_PROG_ID", "generic")):
            value = xdp.get_attr(attr)
            if value:
                ids[mode] = value
    return ids


def _set_xdp(ipr: Any, ifindex: int, fd: int, mode: str, expected_fd: int | None) -> None:
    flags = XDP_FLAGS_DRV_MODE if mode == "native" else XDP_FLAGS_SKB_MODE
    attrs: list[tuple[str, int]] = [("IFLA_XDP_FD", fd)]
    if expected_fd is not None:
        # Replace (or remove) only the program we looked at, never one attached meanwhile.
        attrs.append(("IFLA_XDP_EXPECTED_FD", expected_fd))
        flags |= XDP_FLAGS_REPLACE
    attrs.append(("IFLA_XDP_FLAGS", flags))
    ipr.link("set", index=ifindex, xdp={"attrs": attrs})


def _tc_filters(ipr: Any, ifindex: int, parent: int) -> list[tuple[int, int, str]]:
    """(pref, handle, name) of the bpf filters on a clsact hook; [] without clsact."""
    try:
        msgs = ipr.get_filters(index=ifindex, parent=parent)
    except Exception as exc:  # EINVAL without a clsact qdisc
        if getattr(exc, "code", None) in (errno.EINVAL, errno.ENOENT):
            return []
        raise
    out = []
    for msg in msgs:
        opts = msg.get_attr("TCA_OPTIONS")
        if msg.get_attr("TCA_KIND") != "bpf" or opts is None:
            continue  # the chain header entry
        out.append(((msg["info"] >> 16) & 0xFFFF, msg["handle"], opts.get_attr("TCA_BPF_NAME")))
    return out


def _has_filters(ipr: Any, ifindex: int) -> bool:
    """Does the link's clsact hold any filter at all, ours or anyone's, either direction?"""
    for parent in (TC_H_INGRESS_PARENT, TC_H_EGRESS_PARENT):
        try:
            msgs = ipr.get_filters(index=ifindex, parent=parent)
        except Exception as exc:  # EINVAL without a clsact qdisc
            if getattr(exc, "code", None) in (errno.EINVAL, errno.ENOENT):
                continue
            raise
        if any(msg.get_attr("TCA_KIND") for msg in msgs):
            return True
    return False


def _base(filter_name: str | None) -> str:
    """Our tc filter names are "<program>:<prog id>"; anything else is not ours."""
    return (filter_name or "").split(":")[0]


def _del_filter(ipr: Any, ifindex: int, pref: int, handle: int) -> None:
    ipr.tc("del-filter", "bpf", index=ifindex, parent=TC_H_INGRESS_PARENT, prio=pref,
           handle=handle, protocol=ETH_P_ALL)


# ------------------------------------------------------------------ the owner -------------
@dataclass
class _State:
    guard: GuardCfgC | None = None
    ipip: dict[int, IpipJoin] = field(default_factory=dict)
    registrars: frozenset[str] = frozenset()
    ipip_xdp: bool = False


class BpfDatapath:
    """Owner of joinproxyd's BPF objects, maps and attachments (see the module docstring)."""

    def __init__(self, objects: dict[str, _Object], pin_dir: Path | None,
                 netns: str | None, qdisc_record: Path | None = None) -> None:
        self._objects = objects
        self.pin_dir = pin_dir
        self.netns = netns
        self._nl = _Netlink(netns)
        self._attached: dict[Hook, _Attached] = {}
        # clsact qdiscs we created: this process, or a killed one that wrote them down
        # (qdisc_record.py); only these are ever removed
        self._qdiscs: set[int] = set()
        self._record = QdiscRecord(qdisc_record) if qdisc_record is not None else None
        # jp_ipip_gen starts at random, so an adopted jp_encap_cache entry written for a
        # previous process's configuration cannot carry the same number
        self._generation = int.from_bytes(os.urandom(4), "little")
        self._state = _State()
        self._lock = threading.RLock()
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------
    @classmethod
    def open(cls, obj_dir: str | Path = DEFAULT_OBJ_DIR,
             pin_dir: str | Path | None = DEFAULT_PIN_DIR, *, netns: str | None = None,
             objects: Iterable[str] = ("ipip", "guard"),
             qdisc_record: Path | None = None) -> BpfDatapath:
        """Load the named objects from obj_dir. With pin_dir (on bpffs), maps are pinned
        there and adopted from a previous run; None keeps them private to this process
        (tests, benchmarks). netns names the namespace whose links attach_* works on.
        qdisc_record is the file where the clsact qdiscs we add are claimed (and a killed
        run's claims are adopted from)."""
        obj_dir, pins = Path(obj_dir), Path(pin_dir) if pin_dir is not None else None
        if pins is not None:
            ensure_pin_dir(pins)
        loaded: dict[str, _Object] = {}
        try:
            for name in objects:
                if name not in OBJECTS:
                    raise ValueError(f"unknown BPF object {name!r} (one of {sorted(OBJECTS)})")
                spec = OBJECTS[name]
                loaded[name] = _Object(name, spec, obj_dir / spec.file, pins)
        except BaseException:
            for obj in loaded.values():
                obj.close()
            raise
        dp = cls(loaded, pins, netns, qdisc_record)
        dp._adopt_next_slot()
        try:
            dp._adopt_qdiscs()
        except Exception as exc:  # the data plane works without; only a leftover may stay
            log.error("cannot check the clsact qdiscs an earlier run added: %s", exc)
        return dp

    def _adopt_qdiscs(self) -> None:
        """The clsact qdiscs a killed run of ours claimed, on links that are still the same
        links, are ours to remove when they are empty."""
        if self._record is None or not self._record.load():
            return

        def names(ipr: Any) -> dict[int, str]:
            return {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.link("dump")}

        self._record.keep_only(self._nl.run(names))
        self._qdiscs |= set(self._record.claims)

    def _adopt_next_slot(self) -> None:
        """A pinned jp_guard_next may still point at a killed daemon's jp_xdp_join: point it
        at ours, keeping the fast path on across the restart."""
        if "guard" not in self._objects:
            return
        fd = self._objects["guard"].maps["jp_guard_next"]
        if not _lookup(fd, u32(0), u32()):
            return
        if "ipip" in self._objects:
            self._write_next_slot(True)
            self._state.ipip_xdp = True
        else:  # no encapsulation of ours loaded to hand over to: stop the old one
            _delete(fd, u32(0), "jp_guard_next")

    def close(self, detach: bool = True, unpin: bool = False) -> None:
        """Detach what this process attached (detach=False leaves the programs running, to
        be adopted by the next start), remove the pins if unpin, and free everything."""
        with self._lock:
            if self._closed:
                return
            errors: list[str] = []
            if detach:
                for hook in list(self._attached):
                    try:
                        if hook.kind == "xdp":
                            self._detach_xdp(hook.ifindex, Program(hook.program), own=True)
                        else:
                            self._detach_tc(hook.ifindex, Program(hook.program), own=True)
                    except KernelError as exc:
                        errors.append(str(exc))
                try:  # a killed run's, on links this one did not use
                    self._remove_empty_qdiscs()
                except KernelError as exc:
                    errors.append(str(exc))
            self._nl.close()
            pins = [p for obj in self._objects.values() for p in obj.pins]
            for obj in self._objects.values():
                obj.close()
            self._closed = True
            if unpin:
                for pin in dict.fromkeys(pins):
                    try:
                        os.unlink(pin)
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        errors.append(f"unlink {pin}: {describe_errno(exc.errno or 0)}")
                if self.pin_dir is not None:
                    with contextlib.suppress(OSError):  # not empty: others' pins stay
                        self.pin_dir.rmdir()
            if errors:
                raise KernelError("closing the BPF data plane: " + "; ".join(errors))

    def __enter__(self) -> BpfDatapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ----------------------------------------------------------------------------
    def _obj(self, name: str) -> _Object:
        if self._closed:
            raise KernelError("the BPF data plane is closed", errno=errno.EBADF)
        try:
            return self._objects[name]
        except KeyError:
            raise KernelError(f"BPF object {name!r} not loaded", errno=errno.ENOENT) from None

    def _map(self, obj: str, name: str) -> int:
        return self._obj(obj).maps[name]

    def prog_fd(self, program: Program | str) -> int:
        program = Program(program)
        for obj in self._objects.values():
            if program in obj.progs:
                return obj.progs[program]
        raise KernelError(f"program {program} not loaded", errno=errno.ENOENT)

    def prog_id(self, program: Program | str) -> int:
        return prog_id_of_fd(self.prog_fd(program))

    def _own_ids(self) -> dict[int, int]:
        """prog id -> fd, for every program of ours this process can name: its own, and the
        ones a previous daemon pinned."""
        ids = {prog_id_of_fd(fd): fd for obj in self._objects.values()
               for fd in obj.progs.values()}
        for obj in self._objects.values():
            ids.update(obj.previous)
        return ids

    def _ours(self, prog_id: int) -> bool:
        """Is the program with this id joinproxyd's? Known ids first; the kernel's name only
        when this process may ask for it (root)."""
        return prog_id in self._own_ids() or prog_name_by_id(prog_id) in OUR_PROGRAM_NAMES

    def _name_of(self, prog_id: int) -> str:
        """Name of one of our programs by id: from an fd we hold (no privilege needed), else
        from the kernel (root only)."""
        fd = self._own_ids().get(prog_id)
        if fd is not None:
            return _info(fd)[64:80].split(b"\0")[0].decode(errors="replace")
        return prog_name_by_id(prog_id) or "?"

    def _xdp_swap(self, ipr: Any, ifindex: int, fd: int, mode: str,
                  old_id: int | None) -> None:
        """Attach fd (-1: detach) in mode; if old_id is given, replace exactly that program
        when we can hold an fd on it (the kernel then refuses if another one came meanwhile)."""
        expected, close_after = None, False
        if old_id:
            expected = self._own_ids().get(old_id)
            if expected is None:
                by_id = libbpf().bpf_prog_get_fd_by_id(old_id)  # root only
                if by_id >= 0:
                    expected, close_after = by_id, True
        try:
            _set_xdp(ipr, ifindex, fd, mode, expected)
        finally:
            if close_after and expected is not None:
                os.close(expected)

    def map_id(self, obj: str, name: str) -> int:
        return int.from_bytes(_info(self._map(obj, name))[4:8], "little")

    def ifindex(self, iface: int | str) -> int:
        if isinstance(iface, int):
            return iface

        def lookup(ipr: Any) -> int:
            found = ipr.link_lookup(ifname=iface)
            if not found:
                raise KernelError(f"{iface}: no such interface", errno=errno.ENODEV)
            return int(found[0])

        return self._nl.run(lookup)

    # -- guard ------------------------------------------------------------------------------
    def set_guard(self, rate_pps: int, burst: int, ports: Iterable[int],
                  syn_rate_pps: int | None = None, syn_burst: int | None = None) -> None:
        """UDP rate (datagrams/s per source and interface; 0 turns the whole guard off) and
        burst, the join ports it watches (TCP and UDP), and the TCP SYN rate and burst (new
        connections; by default the UDP ones; other TCP segments are never limited). Takes
        effect at the next packet."""
        ports = sorted(set(ports))
        syn_rate_pps = rate_pps if syn_rate_pps is None else syn_rate_pps
        syn_burst = burst if syn_burst is None else syn_burst
        for name, rate in (("rate_pps", rate_pps), ("syn_rate_pps", syn_rate_pps)):
            if not 0 <= rate <= 10_000_000:
                raise ValueError(f"{name}: between 0 and 10000000 (got {rate})")
        for name, depth in (("burst", burst), ("syn_burst", syn_burst)):
            if not 1 <= depth <= 1_000_000:
                raise ValueError(f"{name}: between 1 and 1000000 (got {depth})")
        if len(ports) > JP_GUARD_MAX_PORTS or any(not 1 <= p <= 65535 for p in ports):
            raise ValueError(f"ports: up to {JP_GUARD_MAX_PORTS} ports in 1..65535 (got {ports})")
        cfg = GuardCfgC(rate_pps=rate_pps, burst=burst, syn_rate_pps=syn_rate_pps,
                        syn_burst=syn_burst)
        for i, port in enumerate(ports):
            cfg.ports[i] = port
        with self._lock:
            _update(self._map("guard", "jp_guard_cfg"), u32(0), cfg, "jp_guard_cfg")
            self._state.guard = cfg

    def guard_bucket(self, source: str, ifindex: int,
                     proto: int = 17) -> tuple[float, int, int] | None:
        """(tokens, last refill ns, packets dropped) of one bucket (proto 17: UDP; 6: TCP
        SYNs), for status and tests."""
        key = GuardKeyC(ifindex=ifindex, proto=proto)
        addr = ipaddress.ip_address(source.split("%")[0])
        if isinstance(addr, ipaddress.IPv4Address):
            addr = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + addr.packed)
        key.addr[:] = addr.packed
        value = GuardBucketC()
        with self._lock:
            if not _lookup(self._map("guard", "jp_guard_bkt"), key, value):
                return None
        return value.tokens / JP_TOKEN_ONE, value.last_ns, value.drops

    def guard_drops_by_source(self) -> dict[tuple[str, int, int], int]:
        """(source, ifindex, proto) -> packets the guard dropped, for every bucket that
        dropped any (one map walk: up to 65536 lookups)."""
        out: dict[tuple[str, int, int], int] = {}
        value = GuardBucketC()
        with self._lock:
            fd = self._map("guard", "jp_guard_bkt")
            for key in _keys(fd, GuardKeyC):
                if _lookup(fd, key, value) and value.drops:
                    addr = ipaddress.IPv6Address(bytes(key.addr))
                    source = addr.ipv4_mapped or addr
                    out[(str(source), key.ifindex, key.proto)] = value.drops
        return out

    def attach_guard(self, iface: int | str) -> str:
        """The guard on a join link's XDP hook; returns "native" or "generic"."""
        return self.attach_xdp(iface, Program.GUARD)

    def detach_guard(self, iface: int | str) -> None:
        self.detach_xdp(iface, Program.GUARD)

    # -- ipip -------------------------------------------------------------------------------
    def set_ipip(self, joins: Mapping[int, IpipJoin], registrars: Iterable[str] = ()) -> None:
        """The whole IPIP configuration: join ifindex -> IpipJoin. Registrars allowed to send
        IPIP are every join's registrar plus `registrars` (e.g. the one being failed away
        from). Idempotent; entries not in the arguments are removed."""
        by_src: dict[bytes, int] = {}
        for ifindex, join in joins.items():
            src = _ipv6(join.outer_src, "outer_src").packed
            if src in by_src:
                raise ValueError(f"outer_src {join.outer_src} is used by join links "
                                 f"{by_src[src]} and {ifindex}: one backbone address per link")
            by_src[src] = ifindex
        if len(joins) > JP_MAX_JOIN_LINKS:
            raise ValueError(f"at most {JP_MAX_JOIN_LINKS} join links (got {len(joins)})")
        allowed = frozenset({j.registrar for j in joins.values()} | set(registrars))
        for r in allowed:
            _ipv6(r, "registrar")
        with self._lock:
            cfg_fd = self._map("ipip", "jp_join_cfg")
            bb_fd = self._map("ipip", "jp_bb_addrs")
            reg_fd = self._map("ipip", "jp_registrars")
            # Return path first (registrars, backbone addresses), then the join side, so no
            # packet is sent whose reply would be refused; removal goes the other way.
            want_regs = {bytes(_addr_key(r).addr) for r in allowed}
            for r in allowed:
                _update(reg_fd, _addr_key(r), RegistrarC(), "jp_registrars")
            want_bb = {}
            for ifindex, join in joins.items():
                key = _addr_key(join.outer_src)
                want_bb[bytes(key.addr)] = ifindex
                _update(bb_fd, key, BbAddrC(join_ifindex=ifindex), "jp_bb_addrs")
            for ifindex, join in joins.items():
                _update(cfg_fd, u32(ifindex), join.to_c(), "jp_join_cfg")
            for key in _keys(cfg_fd, u32):
                if key.value not in joins:
                    _delete(cfg_fd, key, "jp_join_cfg")
            # After the entries: a program that sees the new generation rebuilds its cached
            # copy from the new configuration.
            self._generation = (self._generation + 1) & 0xFFFFFFFF
            _update(self._map("ipip", "jp_ipip_gen"), u32(0), IpipGenC(self._generation),
                    "jp_ipip_gen")
            for key in _keys(bb_fd, AddrC):
                if bytes(key.addr) not in want_bb:
                    _delete(bb_fd, key, "jp_bb_addrs")
            for key in _keys(reg_fd, AddrC):
                if bytes(key.addr) not in want_regs:
                    _delete(reg_fd, key, "jp_registrars")
            self._state.ipip = dict(joins)
            self._state.registrars = allowed

    def set_ipip_xdp(self, enabled: bool) -> None:
        """Run jp_xdp_join after the guard on every guarded link (it ignores links without an
        IPIP entry). The tc programs stay attached as the slow path: packets whose next hop
        the XDP program cannot resolve, and packets too big for the backbone (tc answers
        them with a Packet Too Big), are passed to them."""
        with self._lock:
            self._write_next_slot(enabled)
            self._state.ipip_xdp = enabled

    def _write_next_slot(self, enabled: bool) -> None:
        fd = self._map("guard", "jp_guard_next")
        if enabled:
            _update(fd, u32(0), ctypes.c_int(self.prog_fd(Program.XDP_JOIN)), "jp_guard_next")
        else:
            _delete(fd, u32(0), "jp_guard_next")

    def attach_ipip_join(self, iface: int | str) -> None:
        self.attach_tc(iface, Program.TC_JOIN)

    def detach_ipip_join(self, iface: int | str) -> None:
        self.detach_tc(iface, Program.TC_JOIN)

    def attach_ipip_backbone(self, iface: int | str) -> None:
        self.attach_tc(iface, Program.TC_BACKBONE)

    def detach_ipip_backbone(self, iface: int | str) -> None:
        self.detach_tc(iface, Program.TC_BACKBONE)

    # -- bare redirect (benchmarks) --------------------------------------------------------
    def set_bare_target(self, ifindex: int) -> None:
        """Where jp_bare_redir sends frames; 0 makes it a counting sink."""
        with self._lock:
            _update(self._map("bare", "jp_bare_cfg"), u32(0), BareCfgC(ifindex=ifindex),
                    "jp_bare_cfg")

    # -- attach / detach ------------------------------------------------------------------
    # Ours is recognised by program name: the kernel's name of an XDP program, and for tc the
    # filter name we give, "<program>:<prog id>" (the id tells this process's instance from a
    # previous one's). Explicit detach_* remove any instance of ours; close() only its own.

    def attach_xdp(self, iface: int | str, program: Program | str) -> str:
        """Put program on the link's XDP hook, natively or else generically (logged),
        replacing any joinproxyd program there. Returns the mode used."""
        program = Program(program)
        if program not in XDP_PROGRAMS:
            raise ValueError(f"{program} is not an XDP program")
        fd = self.prog_fd(program)
        ifindex = self.ifindex(iface)

        def attach(ipr: Any) -> str:
            ours: dict[str, int] = {}
            for mode, prog_id in _xdp_ids(ipr, ifindex).items():
                if not self._ours(prog_id):
                    name = prog_name_by_id(prog_id) or "name unknown without CAP_SYS_ADMIN"
                    raise KernelError(f"{iface}: XDP hook holds another program ({name}, id "
                                      f"{prog_id}); not replacing it", errno=errno.EBUSY)
                ours[mode] = prog_id
            if "generic" in ours:
                # A link cannot have native and generic programs at once: a previous run
                # fell back to generic; take it off before trying native again.
                self._xdp_swap(ipr, ifindex, -1, "generic", ours.pop("generic"))
            try:
                self._xdp_swap(ipr, ifindex, fd, "native", ours.get("native"))
                return "native"
            except Exception as exc:
                if "native" in ours:
                    raise _nl_error(exc, f"{iface}: replace XDP program") from exc
                log.info("%s: native XDP refused (%s); attaching %s in generic mode",
                         iface, _nl_error(exc, "attach"), program)
            try:
                self._xdp_swap(ipr, ifindex, fd, "generic", None)
            except Exception as exc:
                raise _nl_error(exc, f"{iface}: attach XDP program {program}") from exc
            return "generic"

        with self._lock:
            mode = self._nl.run(attach)
            for hook in [h for h in self._attached if h.kind == "xdp" and h.ifindex == ifindex]:
                del self._attached[hook]  # replaced on the hook
            self._attached[Hook("xdp", ifindex, program.value)] = _Attached(program, mode)
            log.debug("%s: %s attached (XDP %s)", iface, program, mode)
            return mode

    def detach_xdp(self, iface: int | str, program: Program | str | None = None) -> None:
        """Remove our program (any of ours if program is None) from the link's XDP hook,
        whichever process attached it; a foreign program or none is left alone."""
        ifindex = self.ifindex(iface)
        with self._lock:
            self._detach_xdp(ifindex, Program(program) if program is not None else None)

    def _tc_name(self, program: Program) -> str:
        return f"{program.value}:{self.prog_id(program)}"

    def attach_tc(self, iface: int | str, program: Program | str) -> None:
        """Put program on the link's clsact ingress hook (direct action), replacing any
        instance of it (ours or a previous run's) at any preference."""
        program = Program(program)
        if program not in TC_PREF:
            raise ValueError(f"{program} is not a tc program")
        fd = self.prog_fd(program)
        ifindex = self.ifindex(iface)
        pref, name = TC_PREF[program], self._tc_name(program)

        def attach(ipr: Any) -> bool:
            created = True
            claimed = ifindex not in self._qdiscs and self._record is not None
            if claimed and self._record is not None:  # written down before it exists
                link = ipr.link("get", index=ifindex)[0]
                self._record.claim(ifindex, link.get_attr("IFLA_IFNAME"))
            try:
                ipr.tc("add", "clsact", index=ifindex)
            except Exception as exc:
                if claimed and self._record is not None:
                    self._record.withdraw(ifindex)
                if getattr(exc, "code", None) != errno.EEXIST:
                    raise _nl_error(exc, f"{iface}: add clsact qdisc") from exc
                # already there: normal; ours only if we (or a killed run) added it
                created = False
            try:
                # replace is atomic: no packet sees the hook empty
                ipr.tc("replace-filter", "bpf", index=ifindex, parent=TC_H_INGRESS_PARENT,
                       prio=pref, handle=TC_HANDLE, protocol=ETH_P_ALL, fd=fd, name=name,
                       direct_action=True)
                for other_pref, handle, other in _tc_filters(ipr, ifindex, TC_H_INGRESS_PARENT):
                    if _base(other) == program and (other_pref, handle) != (pref, TC_HANDLE):
                        _del_filter(ipr, ifindex, other_pref, handle)
            except Exception as exc:
                raise _nl_error(exc, f"{iface}: attach tc program {program}") from exc
            return created

        with self._lock:
            if self._nl.run(attach):
                self._qdiscs.add(ifindex)
            self._attached[Hook("tc-ingress", ifindex, program.value)] = \
                _Attached(program, "ingress")
            log.debug("%s: %s attached (tc ingress)", iface, program)

    def detach_tc(self, iface: int | str, program: Program | str) -> None:
        """Remove every instance of our program from the link's clsact ingress hook, and the
        clsact qdisc if this process created it and nothing is left on it."""
        ifindex = self.ifindex(iface)
        with self._lock:
            self._detach_tc(ifindex, Program(program))

    def _detach_xdp(self, ifindex: int, program: Program | None, own: bool = False) -> None:
        """Take our program (that program only, if given) off the link's XDP hook; with own,
        only this process's instance (atomically: the kernel checks it is still there)."""
        own_fd = self.prog_fd(program) if own and program is not None else None

        def remove(ipr: Any) -> None:
            for mode, prog_id in _xdp_ids(ipr, ifindex).items():
                if not self._ours(prog_id):
                    continue
                name = self._name_of(prog_id)
                if program is not None and name != program:
                    continue
                if own_fd is None:
                    self._xdp_swap(ipr, ifindex, -1, mode, prog_id)
                    continue
                try:
                    _set_xdp(ipr, ifindex, -1, mode, own_fd)
                except Exception as exc:
                    if getattr(exc, "code", None) != errno.EEXIST:
                        raise
                    log.info("ifindex %d: XDP %s was replaced by another instance; left",
                             ifindex, name)

        self._netlink_tolerant(remove, f"ifindex {ifindex}: detach XDP")
        for hook in [h for h in self._attached if h.kind == "xdp" and h.ifindex == ifindex]:
            del self._attached[hook]

    def _detach_tc(self, ifindex: int, program: Program, own: bool = False) -> None:
        created = ifindex in self._qdiscs
        own_name = self._tc_name(program) if own else None

        def remove(ipr: Any) -> None:
            for pref, handle, name in _tc_filters(ipr, ifindex, TC_H_INGRESS_PARENT):
                if _base(name) == program and own_name in (None, name):
                    _del_filter(ipr, ifindex, pref, handle)
            if created and not _has_filters(ipr, ifindex):
                self._del_qdisc(ipr, ifindex)

        self._netlink_tolerant(remove, f"ifindex {ifindex}: detach {program}")
        self._attached.pop(Hook("tc-ingress", ifindex, program.value), None)

    def _del_qdisc(self, ipr: Any, ifindex: int) -> None:
        try:
            ipr.tc("del", "clsact", index=ifindex)
        except Exception as exc:  # gone already (with its link, or removed by hand)
            if getattr(exc, "code", None) not in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                raise
        self._qdiscs.discard(ifindex)
        if self._record is not None:
            self._record.withdraw(ifindex)

    def _remove_empty_qdiscs(self) -> list[int]:
        """Remove the clsact qdiscs of ours (this run's or a killed run's) that hold no
        filter of anyone's and carry no program this process attached."""
        busy = {h.ifindex for h in self._attached if h.kind == "tc-ingress"}
        removed = []
        for ifindex in sorted(self._qdiscs - busy):

            def remove(ipr: Any, ifindex: int = ifindex) -> bool:
                if _has_filters(ipr, ifindex):
                    return False
                self._del_qdisc(ipr, ifindex)
                return True

            try:
                done = self._nl.run(remove)
            except Exception as exc:
                if getattr(exc, "code", None) == errno.ENODEV:  # the link is gone
                    self._qdiscs.discard(ifindex)
                    if self._record is not None:
                        self._record.withdraw(ifindex)
                    continue
                raise _nl_error(exc, f"ifindex {ifindex}: remove clsact qdisc") from exc
            if done:
                removed.append(ifindex)
                log.info("removed the clsact qdisc an earlier run added on ifindex %d",
                         ifindex)
        return removed

    def _netlink_tolerant(self, fn: Callable[[Any], None], what: str) -> None:
        """Run a removal; a link that is gone meanwhile has nothing left to remove."""
        try:
            self._nl.run(fn)
        except KernelError:
            raise
        except Exception as exc:
            if getattr(exc, "code", None) != errno.ENODEV:
                raise _nl_error(exc, what) from exc

    def hooks(self) -> list[Hook]:
        """Every hook in this namespace holding one of our programs, whoever attached it
        (this process or a previous one)."""

        def scan(ipr: Any) -> list[Hook]:
            found: list[Hook] = []
            for link in ipr.link("dump"):
                ifindex = link["index"]
                for prog_id in _xdp_ids(ipr, ifindex).values():
                    if self._ours(prog_id):
                        found.append(Hook("xdp", ifindex, self._name_of(prog_id)))
                for _, _, name in _tc_filters(ipr, ifindex, TC_H_INGRESS_PARENT):
                    if _base(name) in OUR_PROGRAM_NAMES:
                        found.append(Hook("tc-ingress", ifindex, _base(name)))
            return found

        return self._nl.run(scan)

    def attached(self) -> list[Hook]:
        """The hooks this process attached (and has not detached)."""
        with self._lock:
            return list(self._attached)

    def detach_stale(self) -> list[Hook]:
        """Remove our programs from every hook this process did not attach (left by a killed
        daemon). Call once the control plane has attached everything it wants."""
        removed = []
        with self._lock:
            for hook in self.hooks():
                if hook in self._attached:
                    continue
                if hook.kind == "xdp":
                    self._detach_xdp(hook.ifindex, None)
                else:
                    self._detach_tc(hook.ifindex, Program(hook.program))
                removed.append(hook)
                log.info("removed a stale %s from ifindex %d (%s)", hook.program, hook.ifindex,
                         hook.kind)
            self._remove_empty_qdiscs()
        return removed

    # -- counters -----------------------------------------------------------------------
    def _rows(self) -> dict[Program, CountersC]:
        lib = libbpf()
        rows: dict[Program, CountersC] = {}
        with self._lock:
            if self._closed:
                return rows
            for obj in self._objects.values():
                fd = obj.maps["jp_counters"]
                per_cpu = (CountersC * lib.ncpus)()
                for program in obj.spec.programs:
                    key = u32(list(Program).index(program))
                    _check(lib.bpf_map_lookup_elem(fd, ctypes.byref(key),
                                                   ctypes.byref(per_cpu)),
                           "read jp_counters")
                    total = CountersC()
                    for cpu in per_cpu:
                        for i in range(len(Action)):
                            total.action[i] += cpu.action[i]
                        for i in range(len(DropReason)):
                            total.drop[i] += cpu.drop[i]
                    rows[program] = total
        return rows

    def counters(self) -> dict[tuple[str, str], int]:
        """(program name, action) -> packets, summed over CPUs; every pair, zeros included."""
        return {(program.value, action.value): row.action[i]
                for program, row in self._rows().items() for i, action in enumerate(Action)}

    def drops(self) -> dict[tuple[str, str], int]:
        """(program name, DropReason value) -> packets, summed over CPUs."""
        return {(program.value, reason.value): row.drop[i]
                for program, row in self._rows().items() for i, reason in enumerate(DropReason)}

    def nexthops(self) -> dict[int, dict[str, Any]]:
        """Join ifindex -> the backbone next hop the IPIP programs use without a route lookup
        ({"ifindex", "dmac", "smac", "mtu"}), for links where some CPU has one cached."""
        lib = libbpf()
        out: dict[int, dict[str, Any]] = {}
        with self._lock:
            if self._closed or "ipip" not in self._objects:
                return out
            fd = self._map("ipip", "jp_encap_cache")
            for ifindex in self._state.ipip:
                per_cpu = (EncapC * lib.ncpus)()
                _check(lib.bpf_map_lookup_elem(fd, ctypes.byref(u32(ifindex % JP_ENCAP_SLOTS)),
                                               ctypes.byref(per_cpu)), "read jp_encap_cache")
                known = [e for e in per_cpu if e.ifindex == ifindex and e.egress
                         and e.generation == self._generation]
                if known:
                    e = max(known, key=lambda n: n.expires)
                    macs = bytes(e.hdr[JP_ENCAP_ETH:JP_ENCAP_ETH + 12])
                    out[ifindex] = {"ifindex": e.egress, "mtu": e.mtu,
                                    "dmac": ":".join(f"{b:02x}" for b in macs[:6]),
                                    "smac": ":".join(f"{b:02x}" for b in macs[6:])}
        return out

    def ipip_maps(self) -> dict[str, Any]:
        """What the IPIP maps hold, read back from the kernel (not this process's record):
        {"join": {ifindex: {...}}, "backbone_addresses": {address: ifindex},
        "registrars": [address]}. Every entry is per join link or per registrar, never per
        pledge: tests and operators can check the proxy stays stateless."""
        def text(raw: Any) -> str:
            return str(ipaddress.IPv6Address(bytes(raw)))

        out: dict[str, Any] = {"join": {}, "backbone_addresses": {}, "registrars": []}
        with self._lock:
            if self._closed or "ipip" not in self._objects:
                return out
            cfg_fd = self._map("ipip", "jp_join_cfg")
            for key in _keys(cfg_fd, u32):
                cfg = JoinCfgC()
                if _lookup(cfg_fd, key, cfg):
                    out["join"][key.value] = {
                        "registrar_ll": text(cfg.registrar_ll), "outer_src": text(cfg.outer_src),
                        "registrar": text(cfg.outer_dst), "backbone_ifindex": cfg.backbone_ifindex,
                        "ports": [p for p in cfg.ports if p], "proto": cfg.proto}
            bb_fd = self._map("ipip", "jp_bb_addrs")
            for addr in _keys(bb_fd, AddrC):
                bb = BbAddrC()
                if _lookup(bb_fd, addr, bb):
                    out["backbone_addresses"][text(addr.addr)] = bb.join_ifindex
            out["registrars"] = sorted(text(a.addr)
                                       for a in _keys(self._map("ipip", "jp_registrars"), AddrC))
        return out

    def kernel_drops(self, programs: Iterable[Program] = IPIP_PROGRAMS) -> dict[str, int]:
        """Drops by DropReason value over the given programs, for RelayMode.kernel_drops."""
        wanted = {Program(p).value for p in programs}
        out: dict[str, int] = {}
        for (program, reason), value in self.drops().items():
            if program in wanted and value:
                out[reason] = out.get(reason, 0) + value
        return out

    def status(self) -> dict[str, Any]:
        """A JSON-ready view for joinproxyctl."""
        with self._lock:
            guard = self._state.guard
            return {
                "pin_dir": str(self.pin_dir) if self.pin_dir else None,
                "attached": [{"hook": h.kind, "ifindex": h.ifindex, "program": h.program,
                              "mode": a.mode}
                             for h, a in sorted(self._attached.items(),
                                                key=lambda kv: (kv[0].ifindex, kv[0].kind))],
                "guard": None if guard is None else {
                    "rate_pps": guard.rate_pps, "burst": guard.burst,
                    "ports": [p for p in guard.ports if p],
                    "syn_rate_pps": guard.syn_rate_pps, "syn_burst": guard.syn_burst},
                "ipip": {str(i): {"registrar_ll": j.registrar_ll, "outer_src": j.outer_src,
                                  "registrar": j.registrar, "proto": j.proto,
                                  "ports": list(j.ports)} for i, j in self._state.ipip.items()},
                "ipip_xdp": self._state.ipip_xdp,
                "nexthops": {str(i): nh for i, nh in self.nexthops().items()},
            }

    # -- BPF_PROG_TEST_RUN --------------------------------------------------------------
    def _run(self, program: Program, packet: bytes, repeat: int, live: bool, ifindex: int,
             batch_size: int = 0) -> tuple[int, bytes, int]:
        fd = self.prog_fd(program)
        data_in = ctypes.create_string_buffer(packet, len(packet))
        out_size = 0 if live else len(packet) + 512
        data_out = ctypes.create_string_buffer(out_size) if out_size else None
        opts = TestRunOpts(sz=ctypes.sizeof(TestRunOpts), repeat=repeat)
        opts.data_in = ctypes.cast(data_in, ctypes.c_void_p)
        opts.data_size_in = len(packet)
        if data_out is not None:
            opts.data_out = ctypes.cast(data_out, ctypes.c_void_p)
            opts.data_size_out = out_size
        ctx: Any = None
        if program in XDP_PROGRAMS:
            if ifindex or live:
                ctx = XdpMdC(data=0, data_end=len(packet), ingress_ifindex=ifindex)
        elif ifindex:
            ctx = ctypes.create_string_buffer(SKB_CTX_SIZE)
            ctypes.memmove(ctypes.addressof(ctx) + SKB_CTX_IFINDEX_OFFSET,
                           ctypes.byref(u32(ifindex)), 4)
        if ctx is not None:
            opts.ctx_in = ctypes.cast(ctypes.byref(ctx), ctypes.c_void_p)
            opts.ctx_size_in = ctypes.sizeof(ctx)
        if live:
            opts.flags = BPF_F_TEST_XDP_LIVE_FRAMES
            opts.batch_size = batch_size
        _check(libbpf().bpf_prog_test_run_opts(fd, ctypes.byref(opts)),
               f"test run of {program}")
        out = b"" if data_out is None else data_out.raw[:opts.data_size_out]
        return opts.retval, out, opts.duration

    def test_run(self, program: Program | str, packet: bytes, repeat: int = 1,
                 live: bool = False, ifindex: int = 0) -> tuple[int, bytes]:
        """Run program on packet (BPF_PROG_TEST_RUN): (return code, packet after the run).
        live=True (XDP only) sends the resulting frames for real and returns no bytes.
        ifindex is the ingress device (in this thread's namespace); 0 means loopback."""
        program = Program(program)
        if live and program not in XDP_PROGRAMS:
            raise ValueError("live frames exist for XDP programs only")
        retval, out, _ = self._run(program, packet, repeat, live, ifindex)
        return retval, out

    def bench_run(self, program: Program | str, packet: bytes, repeat: int,
                  live: bool = False, ifindex: int = 0, batch_size: int = 0) -> int:
        """Average nanoseconds per run over `repeat` runs (the kernel's measurement)."""
        program = Program(program)
        if live and program not in XDP_PROGRAMS:
            raise ValueError("live frames exist for XDP programs only")
        return self._run(program, packet, repeat, live, ifindex, batch_size)[2]
