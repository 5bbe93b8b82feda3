#!/usr/bin/env bash
# A Debian root filesystem of a release (bookworm, trixie) for booting under systemd-nspawn
# (the system test), cached.
#
#   tools/nspawn-rootfs.sh RELEASE CACHE_DIR DEB...      prints the rootfs directory
#
# Two layers, both kept in CACHE_DIR (under build/, so `make clean` removes them):
#   <release>-base-<key>.tar.zst  debootstrap --variant=minbase with systemd, iproute2,
#                                 nftables and bpftool (the test's own tools); about a minute
#                                 to make, once per machine;
#   <release>-rootfs-<key>/       that base, with apt's package lists and, in apt's archive
#                                 cache, every Debian package that the given .debs depend on
#                                 (apt-get install --download-only in a non-booted container
#                                 on the host's network). The booted test container has no
#                                 route to the mirror: there, `apt-get install --no-download
#                                 ./*.deb` resolves and installs the dependencies from that
#                                 cache, as apt would from the mirror.
# A layer is remade when its key changes: the base when its packages (or LAYOUT) change, the
# rootfs when the base or the .debs' Depends change. Older layers of the release are removed.
# Recipe and traps: ../shared/docs/systemd-container.md.
set -euo pipefail

RELEASE=${1:?usage: nspawn-rootfs.sh RELEASE CACHE_DIR DEB...}
CACHE=${2:?usage: nspawn-rootfs.sh RELEASE CACHE_DIR DEB...}
shift 2
[ $# -gt 0 ] || { echo "nspawn-rootfs.sh: no .deb given" >&2; exit 2; }
mkdir -p "$CACHE"
CACHE=$(realpath "$CACHE")

INCLUDE=systemd,systemd-sysv,dbus,iproute2,nftables,bpftool,procps
# Raise LAYOUT when the base changes other than through INCLUDE (a comment edit costs nothing).
LAYOUT=2
base_key=$( { echo "$LAYOUT"; echo "$INCLUDE"; } | sha256sum | cut -c1-12)
base_tar=$CACHE/$RELEASE-base-$base_key.tar.zst

# The mirror apt already uses: the first deb822 URIs:, else the first one-line "deb URL".
mirror() {
    local url
    url=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$url" ] || url=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}')
    echo "${url:-http://deb.debian.org/debian}"
}

if [ ! -s "$base_tar" ]; then
    echo "nspawn-rootfs: debootstrap $RELEASE (minbase) into the cache, once" >&2
    tmp=$(mktemp -d "$CACHE/base.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    debootstrap --variant=minbase --include="$INCLUDE" "$RELEASE" "$tmp/root" "$(mirror)" \
        > "$CACHE/debootstrap-$RELEASE.log" 2>&1 \
        || { tail -20 "$CACHE/debootstrap-$RELEASE.log" >&2; exit 1; }
    echo jpsys > "$tmp/root/etc/hostname"
    rm -f "$tmp"/root/var/cache/apt/archives/*.deb
    tar -C "$tmp/root" --numeric-owner --xattrs --acls -cf - . | zstd -q -T0 -3 -o "$tmp/base.tar.zst"
    rm -f "$CACHE/$RELEASE"-base-*.tar.zst
    mv "$tmp/base.tar.zst" "$base_tar"
    rm -rf "$tmp"
    trap - EXIT
fi

# What the packages need from Debian decides what the rootfs must hold.
depends=$(for deb in "$@"; do dpkg-deb -f "$deb" Depends Pre-Depends; done | sort -u)
key=$( { echo "$base_key"; echo "$depends"; } | sha256sum | cut -c1-12)
rootfs=$CACHE/$RELEASE-rootfs-$key
if [ ! -e "$rootfs.complete" ]; then
    echo "nspawn-rootfs: preparing $rootfs (base + dependencies in apt's cache)" >&2
    rm -rf "$rootfs" "$rootfs.complete"
    mkdir -p "$rootfs"
    zstd -q -d -c "$base_tar" | tar -C "$rootfs" --numeric-owner --xattrs --acls -xf -
    debs=$(mktemp -d "$CACHE/debs.XXXXXX")
    cp "$@" "$debs/"
    if ! "$(dirname "$0")/nspawn-run.sh" "$rootfs" "jpsys-prep-$$" --bind-ro="$debs:/mnt/deb" -- sh -c \
            'apt-get update -qq && apt-get install -y -qq --download-only /mnt/deb/*.deb' \
            > "$CACHE/prepare-$RELEASE.log" 2>&1; then
        tail -20 "$CACHE/prepare-$RELEASE.log" >&2
        rm -rf "$debs"
        exit 1
    fi
    rm -rf "$debs"
    touch "$rootfs.complete"
fi
for old in "$CACHE/$RELEASE"-rootfs-* "$CACHE"/rootfs-*; do
    case $old in "$rootfs"|"$rootfs.complete") ;; *) rm -rf "$old" ;; esac
done
echo "$rootfs"
