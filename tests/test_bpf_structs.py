"""Kernel and user views of the BPF data plane are defined once and agree (habits 6-8).

- the C enums of ebpf/joinproxy.h against the Python enums (DropReason, Action, Program):
  same names, same values (the C value is the member's position), every value explicit;
- the ctypes mirrors in joinproxyd.kernel.bpf_layout against the BTF of the built objects: size,
  member names, offsets and member sizes;
- the header's array bounds and constants against the mirrors';
- every map that userspace writes is written from joinproxyd/kernel/bpf.py only (through
  the element helpers of kernel/libbpf.py, the one module that names the libbpf calls).

No root needed: BTF is read from the object files with bpftool.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from joinproxyd.kernel import bpf_layout
from joinproxyd.kernel.bpf_layout import OBJECTS, STRUCTS, Action, Program
from joinproxyd.model import DropReason

REPO = Path(__file__).resolve().parent.parent
EBPF = REPO / "ebpf"
HEADER = EBPF / "joinproxy.h"


def c_enums() -> dict[str, list[tuple[str, str]]]:
    """enum name -> [(member, value text)] in source order, comments stripped."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    enums = {}
    for name, body in re.findall(r"enum\s+(\w+)\s*\{(.*?)\};", text, flags=re.S):
        members = []
        for entry in filter(None, (e.strip() for e in body.split(","))):
            member, _, value = (part.strip() for part in entry.partition("="))
            members.append((member, value))
        enums[name] = members
    return enums


@pytest.mark.parametrize(("c_name", "prefix", "py_enum"), [
    ("jp_drop_reason", "JP_DROP_", DropReason),
    ("jp_action", "JP_ACT_", Action),
    ("jp_prog", "JP_PROG_", Program),
])
def test_c_enum_matches_python(c_name: str, prefix: str, py_enum: Any) -> None:
    members = c_enums()[c_name]
    assert all(value for _, value in members), f"{c_name}: every value must be explicit"
    got = [(m, int(v)) for m, v in members]
    want = [(prefix + member.name, i) for i, member in enumerate(py_enum)]
    want.append((prefix + "_COUNT", len(py_enum)))
    assert got == want, (f"ebpf/joinproxy.h enum {c_name} and {py_enum.__name__} disagree; "
                         "add new members at the end of both")


def header_defines() -> dict[str, int]:
    return {k: int(v.rstrip("ULul"))
            for k, v in re.findall(r"#define\s+(JP_\w+)\s+(\d+\w*)", HEADER.read_text())}


def test_header_constants_match_the_mirrors() -> None:
    defines = header_defines()
    assert defines["JP_MAX_PORTS"] == bpf_layout.JP_MAX_PORTS
    assert defines["JP_MAX_JOIN_LINKS"] == bpf_layout.JP_MAX_JOIN_LINKS
    assert defines["JP_GUARD_MAX_PORTS"] == bpf_layout.JP_GUARD_MAX_PORTS
    assert defines["JP_TOKEN_ONE"] == bpf_layout.JP_TOKEN_ONE
    assert defines["JP_IPPROTO_IPV6"] == bpf_layout.IPPROTO_IPV6
    assert defines["JP_IPPROTO_ENCAP"] == bpf_layout.IPPROTO_ENCAP


@cache
def btf_types(obj: str) -> dict[int, dict[str, Any]]:
    if shutil.which("bpftool") is None:
        pytest.fail("bpftool not installed: run 'make setup'")
    path = EBPF / obj
    if not path.exists():
        pytest.fail(f"{path} missing: run 'make -C ebpf' (make setup does)")
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(path)],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return {t["id"]: t for t in json.loads(out)["types"]}


def btf_size(types: dict[int, dict[str, Any]], type_id: int) -> int:
    t = types[type_id]
    if t["kind"] in ("INT", "STRUCT", "UNION", "ENUM"):
        return int(t["size"])
    if t["kind"] == "ARRAY":
        return btf_size(types, t["type_id"]) * int(t["nr_elems"])
    if t["kind"] in ("TYPEDEF", "VOLATILE", "CONST"):
        return btf_size(types, t["type_id"])
    raise AssertionError(f"unexpected BTF kind {t['kind']}")


def struct_in(obj: str, name: str) -> dict[str, Any] | None:
    for t in btf_types(obj).values():
        if t["kind"] == "STRUCT" and t.get("name") == name:
            return t
    return None


def find_struct(name: str) -> tuple[str, dict[int, dict[str, Any]], dict[str, Any]]:
    for spec in OBJECTS.values():
        struct = struct_in(spec.file, name)
        if struct is not None:
            return spec.file, btf_types(spec.file), struct
    raise AssertionError(f"struct {name} is in no object's BTF (is it used by a map?)")


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_ctypes_mirror_matches_btf(name: str) -> None:
    mirror = STRUCTS[name]
    obj, types, struct = find_struct(name)
    assert ctypes.sizeof(mirror) == struct["size"], f"{name}: sizeof differs from {obj}"
    fields = [(m["name"], m["bits_offset"] // 8, btf_size(types, m["type_id"]))
              for m in struct["members"]]
    ours = [(f[0], getattr(mirror, f[0]).offset, getattr(mirror, f[0]).size)
            for f in mirror._fields_]
    assert ours == fields, f"{name}: (member, offset, size) differ from {obj}'s BTF"


def test_every_object_has_the_same_counters_layout() -> None:
    layouts = set()
    for spec in OBJECTS.values():
        struct = struct_in(spec.file, "jp_counters")
        assert struct is not None, spec.file
        layouts.add(json.dumps([(m["name"], m["bits_offset"]) for m in struct["members"]]))
    assert len(layouts) == 1


def test_expected_programs_and_maps_exist_in_the_objects() -> None:
    for spec in OBJECTS.values():
        types = btf_types(spec.file)
        funcs = {t["name"] for t in types.values() if t["kind"] == "FUNC"}
        variables = {t["name"] for t in types.values() if t["kind"] == "VAR"}
        assert {p.value for p in spec.programs} <= funcs, spec.file
        assert set(spec.maps) <= variables, spec.file
    # kernel program names are cut at 15 characters: ours must fit, or names stop matching
    assert all(len(p.value) <= 15 for p in Program)


MAP_WRITES = re.compile(r"bpf_map_(update|delete)_elem|bpftool\s.*map\s+(update|delete)|"
                        r"BPF_MAP_(UPDATE|DELETE)_ELEM|\b(update|delete)_elem\(")
KERNEL = REPO / "daemon" / "joinproxyd" / "kernel"


def test_maps_are_written_from_bpf_py_only() -> None:
    """Habit 7: one writer. Tests and benchmarks go through BpfDatapath too; libbpf.py only
    defines the element helpers bpf.py calls."""
    owners = {KERNEL / "bpf.py", KERNEL / "libbpf.py", Path(__file__).resolve()}
    offenders = []
    for top in ("daemon", "lab", "bench", "registrar", "pledge_sim", "brski", "tests"):
        for path in (REPO / top).rglob("*.py"):
            if path in owners:
                continue
            if MAP_WRITES.search(path.read_text(errors="replace")):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
