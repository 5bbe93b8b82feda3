#!/usr/bin/env bash
# make deb: builds the Debian packages per Debian release into build/deb/<release>/ and runs
# lintian on them.
#
#   tools/build-deb.sh [RELEASE...]     default: $DEBIAN_RELEASES, else "bookworm trixie"
#
# For each release (packaging/debian/vendor.py RELEASES):
#   1. the wheels of the vendored libraries for the release's interpreter (vendor.py download;
#      the only step that needs the package index, skipped when the requirements did not
#      change), into build/deb/wheels-<release>/,
#   2. a source tree staged in build/deb/<release>/src/: the project's packages, packaging/,
#      the prebuilt ebpf/*.bpf.o, debian/ (a copy of packaging/debian, symlinks resolved, its
#      changelog with an entry for the release: version <version>~deb12u1, ~deb13u1, ...) and
#      vendor/wheels/ -- dpkg-buildpackage wants debian/ at the top, the checkout has it
#      under packaging/, and the build must not leave files in the checkout,
#   3. dpkg-buildpackage -b in the release's own build root (tools/deb-buildroot.sh: its
#      python3, debhelper, dh-python), booted not, on a volatile overlay, without network,
#   4. lintian of that release, in the same root: errors fail the build; warnings are printed
#      (overrides of tags the release's lintian does not know are left out of the staged
#      tree before the build: tools/lintian-known-overrides.sh).
# A release whose inputs did not change since its last build is skipped (<release>/.inputs).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=build/deb
VENV_PY=.venv/bin/python
VERSION=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
PKG_VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
if [ "$VERSION" != "$PKG_VERSION" ]; then
    echo "make deb: packaging/debian/changelog has $VERSION, pyproject.toml $PKG_VERSION" >&2
    exit 1
fi
read -r -a releases <<< "${*:-${DEBIAN_RELEASES:-bookworm trixie}}"
mkdir -p "$OUT"
# The layout before per-release builds kept the packages in build/deb/ itself.
rm -rf "$OUT"/*.deb "$OUT"/*.changes "$OUT"/*.buildinfo "$OUT"/.inputs "$OUT"/src "$OUT"/wheels

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
sources_sum=$( { sha256sum "${files[@]}" "${bpf_objects[@]}" "$0" tools/deb-buildroot.sh \
                 tools/nspawn-run.sh tools/lintian-known-overrides.sh; } | sha256sum | cut -d' ' -f1)

build_release() {
    local release=$1 suffix out stage wheels root inputs debs version log lintian_out summary
    suffix=$("$VENV_PY" -c 'import sys, runpy
releases = runpy.run_path("packaging/debian/vendor.py")["RELEASES"]
print(releases[sys.argv[1]]["suffix"] if sys.argv[1] in releases else "")' "$release")
    if [ -z "$suffix" ]; then
        echo "make deb: unknown Debian release '$release' (packaging/debian/vendor.py RELEASES)" >&2
        return 1
    fi
    version=$VERSION$suffix
    out=$OUT/$release
    stage=$out/src
    wheels=$OUT/wheels-$release
    mkdir -p "$out"
    "$VENV_PY" packaging/debian/vendor.py download "$wheels" "$VENV_PY" requirements.txt "$release"
    root=$(tools/deb-buildroot.sh "$release" build/debroot)

    inputs=$(echo "$sources_sum $(cat "$wheels/.inputs") $root" | sha256sum | cut -d' ' -f1)
    debs=("$out"/*_"$version"_*.deb)
    if [ -e "${debs[0]}" ] && [ -e "$out/.inputs" ] && [ "$(cat "$out/.inputs")" = "$inputs" ]; then
        echo "make deb: $release up to date ($out: ${#debs[@]} packages)"
        return 0
    fi

    rm -rf "$stage" "$out"/*.deb "$out"/*.changes "$out"/*.buildinfo "$out/.inputs"
    mkdir -p "$stage/vendor/wheels" "$stage/ebpf"
    tar -cf - "${files[@]}" | tar -xf - -C "$stage"
    cp -rL packaging/debian "$stage/debian"
    cp "$wheels"/*.whl "$stage/vendor/wheels/"
    [ ${#bpf_objects[@]} -eq 0 ] || cp "${bpf_objects[@]}" "$stage/ebpf/"
    # The release's entry on top of the changelog, dated one second after the source's own
    # entry (the build stays reproducible; lintian wants a newer date): the version and the
    # distribution say which release it is for.
    {
        printf 'joinproxyd (%s) %s; urgency=medium\n\n' "$version" "$release"
        printf '  * Built for Debian %s.\n\n' "$release"
        printf ' -- %s  %s\n\n' \
            "$(dpkg-parsechangelog -l packaging/debian/changelog -S Maintainer)" \
            "$(LC_ALL=C date -u -R -d "@$(( $(dpkg-parsechangelog -l packaging/debian/changelog \
                -S Timestamp) + 1 ))")"
        cat packaging/debian/changelog
    } > "$stage/debian/changelog"

    log=$out/build.log
    lintian_out=$out/lintian.txt
    echo "make deb: building $version for $release (${#bpf_objects[@]} BPF objects); log in $log"
    # In the release's root, as it stays (volatile overlay), with no network: the build uses
    # what the root and the staged tree hold, nothing else. dpkg-buildpackage's check of
    # build-essential is skipped (-d): the root has the Build-Depends (deb-buildroot.sh) but
    # not g++ & co., which nothing here compiles with.
    if ! tools/nspawn-run.sh "$root" "jpbuild-$release-$$" --volatile=overlay --private-network \
            --bind="$(realpath "$out"):/build" --chdir=/build/src \
            --setenv=SOURCE_DATE_EPOCH="$(dpkg-parsechangelog -l "$stage/debian/changelog" -S Timestamp)" \
            --setenv=HOME=/build/src --setenv=LANG=C.UTF-8 \
            --bind-ro="$(realpath tools/lintian-known-overrides.sh):/usr/local/bin/lintian-known-overrides" \
            -- sh -c "lintian-known-overrides debian && dpkg-buildpackage -us -uc -b -d" \
            >"$log" 2>&1; then
        tail -40 "$log" >&2
        echo "make deb: dpkg-buildpackage for $release failed; full log in $log" >&2
        return 1
    fi
    # dpkg-buildpackage writes the packages next to the source tree, i.e. into $out.
    # --fail-on error: warnings are reported, not fatal; every override is justified in
    # packaging/debian/*.lintian-overrides.
    if ! tools/nspawn-run.sh "$root" "jpbuild-$release-$$" --volatile=overlay --private-network \
            --bind="$(realpath "$out"):/build" --setenv=LANG=C.UTF-8 \
            -- lintian --fail-on error --display-info --tag-display-limit 0 \
            "/build/joinproxyd_${version}_$(dpkg --print-architecture).changes" \
            >"$lintian_out" 2>&1; then
        cat "$lintian_out" >&2
        echo "make deb: lintian reports errors for $release" >&2
        return 1
    fi
    summary=$(awk -F: '/^[EWIPX]:/ {n[$1]++} END {printf "%d errors, %d warnings, %d info",
        n["E"], n["W"], n["I"]}' "$lintian_out")
    echo "make deb: $release: lintian: $summary (details in $lintian_out)"
    echo "$inputs" > "$out/.inputs"
    ls -1 "$out"/*.deb
}

for release in "${releases[@]}"; do
    build_release "$release"
done
