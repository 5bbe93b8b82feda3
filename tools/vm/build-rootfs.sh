#!/bin/bash
# Build the rootfs `make test-vm` boots (shared/docs/stock-kernel-vm.md): Debian bookworm's
# stock kernel with its modules (ip6_tunnel, act_mirred, cls_flower, ...), iproute2 and
# python3, a small initramfs that mounts a 9p root, and tools/vm/vmtest-init as PID 1. libbpf1
# lets the BPF objects load in the guest (bench/ipip_tunnel_vm.py); python3-six is what the
# host's .venv takes from Debian's python3 (ecdsa needs it) when a job runs from it; curl is
# the independent TLS client that fetches through the kernel tunnel (tests/vm/ipip_enroll_check.py).
# usage: build-rootfs.sh ROOTDIR     (root; debootstrap; the host's apt mirror)
set -euo pipefail
ROOT=$(realpath -m "$1")
HERE=$(dirname "$(readlink -f "$0")")
SRC=/etc/apt/sources.list.d/debian.sources
MIRROR=$(awk '/^URIs:/{print $2; exit}' "$SRC")   # never printed
if [ -e "$ROOT" ]; then echo "$ROOT exists" >&2; exit 1; fi
mkdir -p "$(dirname "$ROOT")"
debootstrap --variant=minbase bookworm "$ROOT" "$MIRROR" >"$ROOT.debootstrap.log" 2>&1
# the host's suites (-updates, -security too): the newest kernel
cp "$SRC" "$ROOT/etc/apt/sources.list.d/debian.sources"; rm -f "$ROOT/etc/apt/sources.list"
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"; chmod +x "$ROOT/usr/sbin/policy-rc.d"
mkdir -p "$ROOT/etc/initramfs-tools/conf.d" "$ROOT/usr/share/initramfs-tools/modules.d"
echo MODULES=list >"$ROOT/etc/initramfs-tools/conf.d/vmtest.conf"
printf '%s\n' virtio_pci 9pnet_virtio 9p >"$ROOT/usr/share/initramfs-tools/modules.d/vmtest"
mount -t proc proc "$ROOT/proc"; trap 'umount "$ROOT/proc"' EXIT
chroot "$ROOT" sh -ec 'export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get -y -q dist-upgrade
  apt-get install -y -q --no-install-recommends kmod iproute2 iputils-ping procps \
      initramfs-tools linux-image-amd64 python3 nftables python3-nftables ethtool libbpf1 \
      python3-six curl ca-certificates
  apt-get clean; rm -rf /var/lib/apt/lists/*' >"$ROOT.apt.log" 2>&1
install -m 755 "$HERE/vmtest-init" "$ROOT/usr/local/sbin/vmtest-init"
mkdir -p "$ROOT/job"
# QEMU boots an uncompressed ELF kernel through its PVH entry: seconds faster under TCG
for z in "$ROOT"/boot/vmlinuz-*; do python3 "$HERE/extract-vmlinux.py" "$z" "${z/vmlinuz/vmlinux}"; done
