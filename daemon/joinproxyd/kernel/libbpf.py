"""libbpf.so.1 through ctypes: the few functions joinproxyd calls, typed; libbpf's messages
routed to logging (a failed load quotes the verifier's log); errno checks; object info; map
element access; BPF_PROG_TEST_RUN. Knows nothing of joinproxyd's maps (bpf_layout.py) or
objects (bpf_object.py).

libbpf 1.x returns -errno from int functions: ``check`` turns that into a KernelError naming
the operation and the errno. The library is loaded on first use, once (``libbpf()``); a
missing library is a KernelError naming the package to install (kernel/features.py).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import os
import threading
from typing import Any

from . import KernelError, describe_errno, features

log = logging.getLogger(__name__)

u32 = ctypes.c_uint32

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
    "bpf_enable_stats": (_c.c_int, [_c.c_int]),
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

    def said_since(self, seen: int, limit: int = 40) -> str:
        """The last lines (up to limit) libbpf said after it had said `seen` lines: after a
        failed load they hold the verifier's complaint."""
        new = min(self.lines_logged - seen, len(_LIBBPF_TAIL), limit)
        return "\n".join(list(_LIBBPF_TAIL)[len(_LIBBPF_TAIL) - new:])

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


def check(rc: int, what: str) -> int:
    """libbpf 1.x returns -errno from int functions."""
    if rc < 0:
        raise KernelError(f"{what}: {describe_errno(-rc)}", errno=-rc)
    return rc


def errno_now() -> int:
    return ctypes.get_errno() or errno.EINVAL


# ------------------------------------------------------------- kernel object info ---------
def obj_info(fd: int) -> bytes:
    """bpf_obj_get_info_by_fd into a zeroed buffer (larger than both info structs: the
    kernel accepts a longer buffer whose tail is zero and writes no pointer field left 0)."""
    buf = ctypes.create_string_buffer(256)
    size = ctypes.c_uint32(len(buf))
    check(libbpf().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)), "bpf_obj_get_info")
    return buf.raw


BPF_STATS_RUN_TIME = 0
_RUN_TIME_NS, _RUN_CNT = 192, 200  # offsets in struct bpf_prog_info


def enable_run_time_stats() -> int:
    """An fd that keeps the kernel's per-program run time accounting on until closed
    (BPF_ENABLE_STATS: nothing global is left switched on after it)."""
    return check(libbpf().bpf_enable_stats(BPF_STATS_RUN_TIME), "bpf_enable_stats")


def prog_run_stats(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a program, counted while run time stats are enabled."""
    raw = obj_info(fd)
    return (int.from_bytes(raw[_RUN_TIME_NS:_RUN_TIME_NS + 8], "little"),
            int.from_bytes(raw[_RUN_CNT:_RUN_CNT + 8], "little"))


def prog_name_of_fd(fd: int) -> str:
    """The kernel's name of a program (bpf_prog_info.name) we hold an fd on."""
    return obj_info(fd)[64:80].split(b"\0")[0].decode(errors="replace")


def prog_name_by_id(prog_id: int) -> str | None:
    """The kernel's name of a loaded program; None if it is gone or this process may not ask
    (BPF_PROG_GET_FD_BY_ID needs CAP_SYS_ADMIN, which the daemon's unit does not grant: hence
    the pinned programs, see bpf_object.LoadedObject)."""
    fd = libbpf().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        return prog_name_of_fd(fd)
    finally:
        os.close(fd)


def prog_id_of_fd(fd: int) -> int:
    return int.from_bytes(obj_info(fd)[4:8], "little")


# ------------------------------------------------------------------ map elements ----------
def update_elem(fd: int, key: Any, value: Any, what: str, flags: int = BPF_ANY) -> None:
    check(libbpf().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), flags),
          f"update {what}")


def lookup_elem(fd: int, key: Any, value: Any) -> bool:
    """Fill value with the entry at key; False if there is none."""
    rc = libbpf().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
    if rc == -errno.ENOENT:
        return False
    check(rc, "map lookup")
    return True


def delete_elem(fd: int, key: Any, what: str) -> bool:
    rc = libbpf().bpf_map_delete_elem(fd, ctypes.byref(key))
    if rc == -errno.ENOENT:
        return False
    check(rc, f"delete {what}")
    return True


def map_keys(fd: int, key_type: type[Any]) -> list[Any]:
    lib = libbpf()
    keys: list[Any] = []
    prev: Any = None
    while True:
        nxt = key_type()
        rc = lib.bpf_map_get_next_key(fd, ctypes.byref(prev) if prev is not None else None,
                                      ctypes.byref(nxt))
        if rc == -errno.ENOENT:
            return keys
        check(rc, "map iteration")
        keys.append(nxt)
        prev = nxt


# ------------------------------------------------------------------ BPF_PROG_TEST_RUN -----
def prog_test_run(fd: int, packet: bytes, repeat: int, *, xdp: bool, live: bool, ifindex: int,
                  batch_size: int = 0, what: str = "test run") -> tuple[int, bytes, int]:
    """Run the program fd on packet: (return code, packet after the run, average ns per
    run). live (XDP only) sends the resulting frames for real and returns no bytes; ifindex
    is the ingress device, looked up in the calling thread's namespace (0: loopback)."""
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
    if xdp:
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
    check(libbpf().bpf_prog_test_run_opts(fd, ctypes.byref(opts)), what)
    out = b"" if data_out is None else data_out.raw[:opts.data_size_out]
    return opts.retval, out, opts.duration


def syscall_run(fd: int, args: ctypes.Structure, what: str) -> int:
    """Run a BPF_PROG_TYPE_SYSCALL program on args (its context, which the kernel writes
    back into args): the program's return code."""
    opts = TestRunOpts(sz=ctypes.sizeof(TestRunOpts))
    opts.ctx_in = ctypes.cast(ctypes.byref(args), ctypes.c_void_p)
    opts.ctx_size_in = ctypes.sizeof(args)
    check(libbpf().bpf_prog_test_run_opts(fd, ctypes.byref(opts)), what)
    return opts.retval
