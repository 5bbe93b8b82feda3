#!/bin/bash
# `make test-vm`: the tests that need what this project's CI kernel lacks (ip6ip6 tunnels),
# run in Debian's stock kernel under QEMU (shared/docs/stock-kernel-vm.md). Builds the rootfs
# once (VM_ROOTFS, about a minute), then boots one VM per job in tests/vm/*.sh (about 30 s
# each under TCG). Exit status: non-zero if any job failed.
set -euo pipefail
TOP=$(dirname "$(dirname "$(dirname "$(readlink -f "$0")")")")
ROOTFS=${VM_ROOTFS:-/var/tmp/joinproxyd-vm/rootfs}
WORK=${VM_WORK:-$TOP/build/vm}
PY=${PY:-$TOP/.venv/bin/python}
[ "$(id -u)" -eq 0 ] || { echo "make test-vm: run as root (debootstrap, namespaces)" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null || "$TOP/tools/ensure-apt.sh" qemu-system-x86 debootstrap
# a rootfs of an older recipe lacks what later jobs need (libbpf1, python3-six, curl): built again
for need in usr/lib/x86_64-linux-gnu/libbpf.so.1 usr/lib/python3/dist-packages/six.py usr/bin/curl; do
    if [ -d "$ROOTFS/boot" ] && [ ! -e "$ROOTFS/$need" ]; then
        echo "make test-vm: $ROOTFS has no /$need: building it again" >&2
        rm -rf "$ROOTFS"
    fi
done
[ -d "$ROOTFS/boot" ] || "$TOP/tools/vm/build-rootfs.sh" "$ROOTFS"
# the libraries the code under test imports that the guest's Debian lacks (pure Python)
LIBS=$("$PY" -c 'import os, pyroute2, prometheus_client as p
print(os.path.dirname(pyroute2.__file__), os.path.dirname(p.__file__))')
fail=0
for job in "$TOP"/tests/vm/*.sh; do
    name=$(basename "$job" .sh)
    # VM_JOBS="a b": only those jobs (while working on one)
    [ -z "${VM_JOBS:-}" ] || [[ " $VM_JOBS " == *" $name "* ]] || continue
    dir=$WORK/$name
    rm -rf "$dir"; mkdir -p "$dir/py"
    cp "$TOP"/tests/vm/"$name"* "$dir/"; cp "$job" "$dir/run.sh"
    cp "$TOP"/tests/vm/ipip_kernel_check.py "$dir/"  # (its peers are shared)
    # shellcheck disable=SC2086  # two paths
    cp -r "$TOP/daemon/joinproxyd" "$TOP/brski" $LIBS "$dir/py/"
    start=$(date +%s)
    if ROOTFS=$ROOTFS REPO=$TOP MEM=1536 "$TOP/tools/vm/run-vm.sh" --timeout 420 "$dir"; then
        echo "test-vm $name: PASS ($(( $(date +%s) - start )) s)"
    else
        echo "test-vm $name: FAIL ($(( $(date +%s) - start )) s); output:"
        cat "$dir/output.log" 2>/dev/null || tail -30 "$dir/serial.log"
        fail=1
    fi
    grep '^CHECK' "$dir/output.log" 2>/dev/null || true
done
exit $fail
