"""Loading joinproxyd's BPF objects: where they are, the bpf filesystem their maps and
programs are pinned on, and one loaded object (open, check every expected map and program by
name, adopt or replace pinned maps, load, pin the programs).

A missing map or program fails with its name; a verifier failure carries libbpf's log; a
pinned map whose type or sizes no longer match the object is replaced, with a log line. The
programs are pinned as prog_<name> so that a restarted daemon knows its predecessor's by id
without CAP_SYS_ADMIN (kernel/bpf_attach.py replaces them on their hooks).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from . import KernelError, describe_errno
from .bpf_layout import CountersC, ObjectSpec, Program
from .libbpf import check, errno_now, libbpf, obj_info

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


# ------------------------------------------------------------------ pinned maps -----------
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
        raw = obj_info(fd)
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
            code = errno_now()
            raise KernelError(f"mount -t bpf {BPFFS_ROOT}: {describe_errno(code)}", errno=code)
        log.info("mounted a bpf filesystem on %s", BPFFS_ROOT)
    try:
        pin_dir.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise KernelError(f"mkdir {pin_dir}: {describe_errno(exc.errno or 0)}",
                          errno=exc.errno) from exc


# ------------------------------------------------------------------ loaded object ---------
class LoadedObject:
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
            code = errno_now()
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
        if pin_dir is not None and self.spec.pin_maps:
            for map_name, handle in handles.items():
                pin = pin_dir / map_name
                self._adopt_or_replace(pin, handle)
                check(lib.bpf_map__set_pin_path(handle, str(pin).encode()),
                      f"{path.name}: pin path for {map_name}")
                self.pins.append(pin)
        # No rodata constants: everything the control plane sets lives in maps, so it can
        # change without a reload.
        seen = lib.lines_logged
        rc = lib.bpf_object__load(self._obj)
        if rc < 0:
            # the end of what libbpf said meanwhile: it holds the verifier's complaint
            detail = lib.said_since(seen)
            raise KernelError(f"load {path.name}: {describe_errno(-rc)}\n{detail}", errno=-rc)
        for map_name, handle in handles.items():
            self.maps[map_name] = check(lib.bpf_map__fd(handle), f"fd of map {map_name}")
        for prog, handle in progs.items():
            self.progs[prog] = check(lib.bpf_program__fd(handle), f"fd of program {prog}")
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
                    info = obj_info(old)
                    if info[64:80].split(b"\0")[0].decode(errors="replace") == prog.value:
                        self.previous[int.from_bytes(info[4:8], "little")] = old
                    else:
                        os.close(old)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(pin)
            check(lib.bpf_obj_pin(fd, str(pin).encode()), f"pin {pin}")
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


