#!/usr/bin/env bash
# A Debian 12 root filesystem for booting under systemd-nspawn (the system test), cached.
#
#   tools/nspawn-rootfs.sh CACHE_DIR DEB...      prints the rootfs directory
#
# Two layers, both kept in CACHE_DIR (under build/, so `make clean` removes them):
#   bookworm-base-<key>.tar.zst   debootstrap --variant=minbase with systemd, iproute2,
#                                 nftables and bpftool (the test's own tools); about a minute
#                                 to make, once per machine;
#   rootfs-<key>/                 that base, with apt's package lists and, in apt's archive
#                                 cache, every Debian package that the given .debs depend on
#                                 (apt-get install --download-only in a non-booted container
#                                 on the host's network). The booted test container has no
#                                 route to the mirror: there, `apt-get install --no-download
#                                 ./*.deb` resolves and installs the dependencies from that
#                                 cache, as apt would from the mirror.
# A layer is remade when its key changes: the base when this script changes, the rootfs when
# the base or the .debs' Depends change. Older layers are removed.
# Recipe and traps: ../shared/docs/systemd-container.md.
set -euo pipefail

CACHE=${1:?usage: nspawn-rootfs.sh CACHE_DIR DEB...}
shift
[ $# -gt 0 ] || { echo "nspawn-rootfs.sh: no .deb given" >&2; exit 2; }
mkdir -p "$CACHE"
CACHE=$(realpath "$CACHE")

INCLUDE=systemd,systemd-sysv,dbus,iproute2,nftables,bpftool,procps
base_key=$(sha256sum "$0" | cut -c1-12)
base_tar=$CACHE/bookworm-base-$base_key.tar.zst

# The mirror apt already uses: the first deb822 URIs:, else the first one-line "deb URL".
mirror() {
    local url
    url=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$url" ] || url=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}')
    echo "${url:-http://deb.debian.org/debian}"
}

# systemd-nspawn --keep-unit makes payload/ and supervisor/ cgroups under the caller's own
# cgroup and leaves them; run it from a cgroup of its own and remove that afterwards.
nspawn_pipe() {
    local root=$1 name
    shift
    name=jpsys-prep-$$
    local rc=0
    (
        for h in systemd unified; do
            [ -d "/sys/fs/cgroup/$h" ] || continue
            mkdir -p "/sys/fs/cgroup/$h/$name"
            echo "$BASHPID" > "/sys/fs/cgroup/$h/$name/cgroup.procs"
        done
        exec systemd-nspawn -q -D "$root" -M "$name" --register=no --keep-unit --pipe \
            --setenv=DEBIAN_FRONTEND=noninteractive "$@" </dev/null
    ) || rc=$?
    for h in systemd unified; do
        [ -d "/sys/fs/cgroup/$h/$name" ] && find "/sys/fs/cgroup/$h/$name" -depth -type d \
            -exec rmdir {} \; 2>/dev/null
    done
    rm -rf "/run/systemd/nspawn/propagate/$name"
    return "$rc"
}

if [ ! -s "$base_tar" ]; then
    echo "nspawn-rootfs: debootstrap bookworm (minbase) into the cache, once" >&2
    tmp=$(mktemp -d "$CACHE/base.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    debootstrap --variant=minbase --include="$INCLUDE" bookworm "$tmp/root" "$(mirror)" \
        > "$CACHE/debootstrap.log" 2>&1 \
        || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
    echo jpsys > "$tmp/root/etc/hostname"
    rm -f "$tmp"/root/var/cache/apt/archives/*.deb
    tar -C "$tmp/root" --numeric-owner --xattrs --acls -cf - . | zstd -q -T0 -3 -o "$tmp/base.tar.zst"
    rm -f "$CACHE"/bookworm-base-*.tar.zst
    mv "$tmp/base.tar.zst" "$base_tar"
    rm -rf "$tmp"
    trap - EXIT
fi

# What the packages need from Debian decides what the rootfs must hold.
depends=$(for deb in "$@"; do dpkg-deb -f "$deb" Depends Pre-Depends; done | sort -u)
key=$( { echo "$base_key"; echo "$depends"; } | sha256sum | cut -c1-12)
rootfs=$CACHE/rootfs-$key
if [ ! -e "$rootfs.complete" ]; then
    echo "nspawn-rootfs: preparing $rootfs (base + dependencies in apt's cache)" >&2
    rm -rf "$rootfs" "$rootfs.complete"
    mkdir -p "$rootfs"
    zstd -q -d -c "$base_tar" | tar -C "$rootfs" --numeric-owner --xattrs --acls -xf -
    debs=$(mktemp -d "$CACHE/debs.XXXXXX")
    cp "$@" "$debs/"
    if ! nspawn_pipe "$rootfs" --bind-ro="$debs:/mnt/deb" sh -c \
            'apt-get update -qq && apt-get install -y -qq --download-only /mnt/deb/*.deb' \
            > "$CACHE/prepare.log" 2>&1; then
        tail -20 "$CACHE/prepare.log" >&2
        rm -rf "$debs"
        exit 1
    fi
    rm -rf "$debs"
    touch "$rootfs.complete"
fi
for old in "$CACHE"/rootfs-*; do
    case $old in "$rootfs"|"$rootfs.complete") ;; *) rm -rf "$old" ;; esac
done
echo "$rootfs"
