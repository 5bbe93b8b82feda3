#!/usr/bin/env bash
# A Debian build root per release for `make deb`, cached: the packages for a release are built
# with that release's interpreter, debhelper, dh-python and lintian.
#
#   tools/deb-buildroot.sh RELEASE CACHE_DIR      prints the build root's directory
#
# CACHE_DIR keeps (under build/, so `make clean` removes them):
#   <release>-<key>.tar.zst   debootstrap --variant=minbase from the mirror apt already uses,
#                             then apt-get install of the Build-Depends of
#                             packaging/debian/control, dpkg-dev and lintian (apt, not
#                             debootstrap's --include: that one cannot resolve the virtual
#                             packages lintian's Perl libraries need on trixie); about a
#                             minute per release, once per machine;
#   <release>-<key>/          that tarball extracted; the build runs on a volatile overlay of
#                             it (tools/build-deb.sh), so it stays pristine.
# The key is the package list (and LAYOUT below): a change remakes the layers, older ones are
# removed. Recipe and traps: ../shared/docs/systemd-container.md.
set -euo pipefail
cd "$(dirname "$0")/.."

RELEASE=${1:?usage: deb-buildroot.sh RELEASE CACHE_DIR}
CACHE=${2:?usage: deb-buildroot.sh RELEASE CACHE_DIR}
mkdir -p "$CACHE"
CACHE=$(realpath "$CACHE")

# Build-Depends of the source package, as apt-get satisfy takes them: what dpkg-buildpackage
# needs, plus lintian for the check after the build.
build_depends=$(sed -n '/^Build-Depends:/,/^[A-Z][A-Za-z-]*:/p' packaging/debian/control \
    | sed '1s/^Build-Depends://; $d' | tr -d '\n' | sed 's/  */ /g; s/^ //; s/,* *$//')
INCLUDE="$build_depends, dpkg-dev, lintian"
# Raise LAYOUT when what the root holds changes other than through INCLUDE.
LAYOUT=2
key=$( { echo "$LAYOUT"; echo "$INCLUDE"; } | sha256sum | cut -c1-12)
tarball=$CACHE/$RELEASE-$key.tar.zst
root=$CACHE/$RELEASE-$key

# The mirror apt already uses: the first deb822 URIs:, else the first one-line "deb URL".
mirror() {
    local url
    url=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$url" ] || url=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}')
    echo "${url:-http://deb.debian.org/debian}"
}

if [ ! -s "$tarball" ]; then
    echo "deb-buildroot: debootstrap $RELEASE (minbase + build dependencies), once" >&2
    tmp=$(mktemp -d "$CACHE/make.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    log=$CACHE/debootstrap-$RELEASE.log
    debootstrap --variant=minbase "$RELEASE" "$tmp/root" "$(mirror)" \
        > "$log" 2>&1 || { tail -20 "$log" >&2; exit 1; }
    # On the host's network (not booted): the only step after debootstrap that downloads.
    tools/nspawn-run.sh "$tmp/root" "jpbuild-prep-$$" -- sh -c \
        "apt-get update -qq && apt-get satisfy -y -qq --no-install-recommends '$INCLUDE' \
         && apt-get clean && rm -rf /var/lib/apt/lists/*" >> "$log" 2>&1 \
        || { tail -20 "$log" >&2; exit 1; }  # (the build installs nothing: no package lists)
    echo "jpbuild-$RELEASE" > "$tmp/root/etc/hostname"
    tar -C "$tmp/root" --numeric-owner --xattrs --acls -cf - . \
        | zstd -q -T0 -3 -o "$tmp/root.tar.zst"
    mv "$tmp/root.tar.zst" "$tarball"
    rm -rf "$tmp"
    trap - EXIT
fi
if [ ! -e "$root.complete" ]; then
    rm -rf "$root"
    mkdir -p "$root"
    zstd -q -d -c "$tarball" | tar -C "$root" --numeric-owner --xattrs --acls -xf -
    touch "$root.complete"
fi
for old in "$CACHE/$RELEASE"-*; do
    case $old in "$tarball"|"$root"|"$root.complete") ;; *) rm -rf "$old" ;; esac
done
echo "$root"
