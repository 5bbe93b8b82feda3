#!/usr/bin/env bash
# make deb: builds the Debian packages into build/deb/ and runs lintian on them.
#
#   1. the wheels of the vendored libraries (packaging/debian/vendor.py download; the only
#      step that needs the package index, skipped when the requirements did not change),
#   2. a source tree staged in build/deb/src/: the project's packages, packaging/, the
#      prebuilt ebpf/*.bpf.o, debian/ (a copy of packaging/debian, symlinks resolved) and
#      vendor/wheels/ -- dpkg-buildpackage wants debian/ at the top, the checkout has it
#      under packaging/, and the build must not leave files in the checkout,
#   3. dpkg-buildpackage -b with a PATH without pyenv (platform.md fact 10) and none of the
#      venv's or pip's environment, so the build is the one a clean Debian 12 machine does,
#   4. lintian: errors fail the build; warnings are printed.
# A build whose inputs did not change since the last one is skipped (build/deb/.inputs).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=build/deb
STAGE=$OUT/src
VENV_PY=.venv/bin/python
VERSION=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
PKG_VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
if [ "$VERSION" != "$PKG_VERSION" ]; then
    echo "make deb: packaging/debian/changelog has $VERSION, pyproject.toml $PKG_VERSION" >&2
    exit 1
fi

mkdir -p "$OUT"
"$VENV_PY" packaging/debian/vendor.py download "$OUT/wheels" "$VENV_PY" requirements.txt

# What goes into the packages: tracked and new (not ignored) files of these folders.
SOURCES=(brski service_notify coaps_io daemon registrar pledge_sim packaging pyproject.toml requirements.txt README.md)
mapfile -t files < <(git ls-files --cached --others --exclude-standard -- "${SOURCES[@]}" \
    | while read -r f; do [ -e "$f" ] && printf '%s\n' "$f"; done | sort -u)
# The BPF objects the daemon loads; not the benchmarks' own (bench/ipip_pps.py's baseline).
BENCH_ONLY_BPF=(ebpf/bare_redirect.bpf.o)
shopt -s nullglob
bpf_objects=()
for obj in ebpf/*.bpf.o; do
    [[ " ${BENCH_ONLY_BPF[*]} " == *" $obj "* ]] || bpf_objects+=("$obj")
done
shopt -u nullglob

inputs=$( { sha256sum "${files[@]}" "${bpf_objects[@]}"
            cat "$OUT/wheels/.inputs" "$0"; } | sha256sum | cut -d' ' -f1)
debs=("$OUT"/*_"$VERSION"_*.deb)
if [ -e "${debs[0]}" ] && [ -e "$OUT/.inputs" ] && [ "$(cat "$OUT/.inputs")" = "$inputs" ]; then
    echo "make deb: up to date ($OUT: ${#debs[@]} packages)"
    exit 0
fi

rm -rf "$STAGE" "$OUT"/*.deb "$OUT"/*.changes "$OUT"/*.buildinfo "$OUT/.inputs"
mkdir -p "$STAGE/vendor/wheels" "$STAGE/ebpf"
tar -cf - "${files[@]}" | tar -xf - -C "$STAGE"
cp -rL packaging/debian "$STAGE/debian"
cp "$OUT"/wheels/*.whl "$STAGE/vendor/wheels/"
[ ${#bpf_objects[@]} -eq 0 ] || cp "${bpf_objects[@]}" "$STAGE/ebpf/"

log=$OUT/build.log
echo "make deb: building $VERSION (${#bpf_objects[@]} BPF objects); log in $log"
if ! (cd "$STAGE" && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$PWD" LANG=C.UTF-8 \
        SOURCE_DATE_EPOCH="$(dpkg-parsechangelog -l debian/changelog -S Timestamp)" \
        dpkg-buildpackage -us -uc -b) >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "make deb: dpkg-buildpackage failed; full log in $log" >&2
    exit 1
fi
# dpkg-buildpackage writes the packages next to the source tree, i.e. into $OUT.

lintian_out=$OUT/lintian.txt
# --fail-on error: warnings are reported, not fatal; every override is justified in
# packaging/debian/*.lintian-overrides.
if ! lintian --fail-on error --display-info --tag-display-limit 0 \
        "$OUT"/joinproxyd_"$VERSION"_*.changes >"$lintian_out" 2>&1; then
    cat "$lintian_out" >&2
    echo "make deb: lintian reports errors" >&2
    exit 1
fi
summary=$(awk -F: '/^[EWIPX]:/ {n[$1]++} END {printf "%d errors, %d warnings, %d info",
    n["E"], n["W"], n["I"]}' "$lintian_out")
echo "make deb: lintian: $summary (details in $lintian_out)"
echo "$inputs" > "$OUT/.inputs"
ls -1 "$OUT"/*.deb
