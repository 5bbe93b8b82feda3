#!/usr/bin/env bash
# make ipk: the OpenWrt package of joinproxyd, built without an OpenWrt buildroot, into
# build/ipk/joinproxyd_<version>-<release>_<arch>.ipk.
#
# It holds what packaging/openwrt/joinproxyd/Makefile installs in a buildroot: the daemon and
# the protocol library under /usr/lib/joinproxyd/python, the pure-Python libraries the
# OpenWrt feeds lack under /usr/lib/joinproxyd/vendor (from the wheels `make deb` fetches,
# without their compiled accelerators), the prebuilt ebpf/*.bpf.o, the procd init script and
# the configuration: /etc/config/joinproxyd (UCI, translated to TOML at start; no join link
# enabled) and /etc/joinproxyd/joinproxyd.toml (run only when the UCI file names it), both
# conffiles. The daemon runs as the user joinproxyd (Require-User: created by postinst) with
# the capabilities of /etc/capabilities/joinproxyd.json. The format is what OpenWrt's ipkg-build writes and opkg
# reads: a gzipped tar of ./debian-binary, ./data.tar.gz and ./control.tar.gz. Files are
# owned by root and dated SOURCE_DATE_EPOCH, so the same inputs give the same package.
#
#   IPK_ARCH (default x86_64): the BPF objects are compiled for the build host's byte order.
set -euo pipefail
cd "$(dirname "$0")/.."

FEED=packaging/openwrt/joinproxyd
OUT=build/ipk
ARCH=${IPK_ARCH:-x86_64}
VERSION=$(sed -n 's/^PKG_VERSION:=//p' "$FEED/Makefile")
RELEASE=$(sed -n 's/^PKG_RELEASE:=//p' "$FEED/Makefile")
PY_VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
if [ "$VERSION" != "$PY_VERSION" ]; then
    echo "make ipk: $FEED/Makefile has $VERSION, pyproject.toml $PY_VERSION" >&2
    exit 1
fi
# The libraries vendored for OpenWrt, at the versions of requirements.txt.
VENDORED=(pyroute2 zeroconf prometheus_client cbor2)
EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}

shopt -s nullglob
bpf_objects=()  # what the daemon loads: not the benchmarks' baseline program
for obj in ebpf/*.bpf.o; do [ "$obj" = ebpf/bare_redirect.bpf.o ] || bpf_objects+=("$obj"); done
shopt -u nullglob
if [ ${#bpf_objects[@]} -eq 0 ]; then
    echo "make ipk: no ebpf/*.bpf.o (make bpf builds them)" >&2
    exit 1
fi

# The wheels make deb fetches for bookworm: only their pure Python parts are used (below).
.venv/bin/python packaging/debian/vendor.py download build/deb/wheels-bookworm .venv/bin/python \
    requirements.txt bookworm

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/data
ctl=$work/control
mkdir -p "$root/usr/bin" "$root/usr/sbin" "$root/usr/lib/joinproxyd/python" \
    "$root/usr/lib/joinproxyd/vendor" "$root/usr/lib/joinproxyd/bpf" "$root/etc/init.d" \
    "$root/etc/joinproxyd" "$root/etc/config" "$root/etc/capabilities" "$ctl"

# The project's code, without caches; lab/, registrar/ and pledge_sim/ stay out (not for a
# router).
tar -cf - --exclude=__pycache__ --exclude='*.pyc' brski service_notify -C daemon joinproxyd \
    | tar -xf - -C "$root/usr/lib/joinproxyd/python"
# The daemon names a missing library by the package that provides it on this system
# (daemon/joinproxyd/kernel/features.py): OpenWrt's, wherever the payload runs.
printf 'openwrt\n' > "$root/usr/lib/joinproxyd/python/joinproxyd/PACKAGED_FOR"
for name in "${VENDORED[@]}"; do
    whl=(build/deb/wheels-bookworm/"$name"-*.whl)
    [ -e "${whl[0]}" ] || { echo "make ipk: no wheel for $name" >&2; exit 1; }
    python3 -m zipfile -e "${whl[0]}" "$root/usr/lib/joinproxyd/vendor"
done
# Pure Python: the compiled modules are optional accelerators built for glibc and this
# machine; the .py files beside them do the same work on any OpenWrt target.
find "$root/usr/lib/joinproxyd/vendor" \( -name '*.so' -o -name '*.pyx' -o -name '*.pxd' \
    -o -name '*.c' -o -name RECORD \) -delete
install -m 0644 "${bpf_objects[@]}" "$root/usr/lib/joinproxyd/bpf/"
install -m 0755 "$FEED/files/joinproxyd.wrapper" "$root/usr/sbin/joinproxyd"
install -m 0755 "$FEED/files/joinproxyctl.wrapper" "$root/usr/bin/joinproxyctl"
install -m 0755 "$FEED/files/joinproxyd.init" "$root/etc/init.d/joinproxyd"
install -m 0644 "$FEED/files/joinproxyd.config" "$root/etc/config/joinproxyd"
install -m 0644 "$FEED/files/joinproxyd.capabilities" "$root/etc/capabilities/joinproxyd.json"
# OpenWrt's names: pledges arrive on the LAN bridge, registrars are on the WAN side.
sed -e 's/^interface = "eth1"/interface = "wan"/' \
    -e 's/^#interfaces = \["lan0"\]/#interfaces = ["br-lan"]/' \
    -e 's|^control_socket = "/run/joinproxyd/|control_socket = "/var/run/joinproxyd/|' \
    packaging/joinproxyd.toml > "$root/etc/joinproxyd/joinproxyd.toml"
chmod 0644 "$root/etc/joinproxyd/joinproxyd.toml"

size=$(du -sb --apparent-size "$root" | cut -f1)
cat > "$ctl/control" <<EOF
Package: joinproxyd
Version: $VERSION-$RELEASE
Depends: libc, python3, python3-ifaddr, kmod-sched-bpf, libbpf, procd-ujail
Source: packaging/openwrt/joinproxyd
SourceName: joinproxyd
License: Apache-2.0
Section: net
SourceDateEpoch: $EPOCH
Maintainer: joinproxyd developers <joinproxyd@example.org>
Architecture: $ARCH
Installed-Size: $size
Require-User: joinproxyd:joinproxyd
Description: BRSKI join proxy for border routers. joinproxyd lets new devices that only have
 a manufacturer identity reach the domain's registrar for zero-touch enrollment (BRSKI,
 RFC 8995), and nothing else. Runs under procd as the user joinproxyd; configuration
 in /etc/config/joinproxyd (UCI; no join link is enabled until you enable one), applied by
 uci commit joinproxyd or /etc/init.d/joinproxyd reload (SIGHUP).
EOF
printf '%s\n' /etc/config/joinproxyd /etc/joinproxyd/joinproxyd.toml > "$ctl/conffiles"
# What OpenWrt's buildroot puts into every package with an init script: create the
# Require-User user and group, enable and start it on a running system (with no join link
# enabled it starts nothing), stop and disable it before removal.
cat > "$ctl/postinst" <<'EOF'
#!/bin/sh
[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0
[ -s "${IPKG_INSTROOT}/lib/functions.sh" ] || exit 0
. "${IPKG_INSTROOT}/lib/functions.sh"
default_postinst "$0" "$@"
EOF
cat > "$ctl/prerm" <<'EOF'
#!/bin/sh
[ -s "${IPKG_INSTROOT}/lib/functions.sh" ] || exit 0
. "${IPKG_INSTROOT}/lib/functions.sh"
default_prerm "$0" "$@"
EOF
chmod 0755 "$ctl/postinst" "$ctl/prerm"

# Reproducible tar members: sorted, root-owned, one date.
tarz() {
    local dir=$1 out=$2
    shift 2
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$EPOCH" --format=gnu \
        -C "$dir" -cf - "$@" | gzip -9n > "$out"
}
printf '2.0\n' > "$work/debian-binary"
tarz "$root" "$work/data.tar.gz" .
tarz "$ctl" "$work/control.tar.gz" .
mkdir -p "$OUT"
ipk=$OUT/joinproxyd_${VERSION}-${RELEASE}_${ARCH}.ipk
rm -f "$OUT"/joinproxyd_*.ipk
tarz "$work" "$ipk" ./debian-binary ./data.tar.gz ./control.tar.gz
echo "make ipk: $ipk ($(du -h "$ipk" | cut -f1), ${#bpf_objects[@]} BPF objects)"
