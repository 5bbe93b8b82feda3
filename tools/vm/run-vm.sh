#!/bin/bash
# Boot Debian's stock kernel from ROOTFS under QEMU (TCG: KVM does not work on this machine
# kind), run JOBDIR/run.sh inside as part of init, power off. Exit status: run.sh's, read
# back from JOBDIR/exit-status (125: QEMU failed or timed out, 126: no status written).
# The guest has no network device; its console is in JOBDIR/serial.log. With REPO=DIR, DIR is
# shared read-only too (9p tag "repo"): a job mounts it where it likes (tests/vm/ipip_mode.sh).
# usage: ROOTFS=DIR [REPO=DIR] run-vm.sh [--timeout S] JOBDIR
set -u
TIMEOUT=300
ROOTFS=${ROOTFS:-/var/tmp/joinproxyd-vm/rootfs}
while [ $# -gt 1 ]; do case $1 in
  --timeout) TIMEOUT=$2; shift 2;;
  *) echo "run-vm.sh: unknown argument $1" >&2; exit 2;; esac; done
JOB=$(readlink -f "$1")
KVER=$(find "$ROOTFS/lib/modules" -mindepth 1 -maxdepth 1 -printf "%f\n" | sort -V | tail -1)
KERNEL=$ROOTFS/boot/vmlinux-$KVER
[ -e "$KERNEL" ] || KERNEL=$ROOTFS/boot/vmlinuz-$KVER
rm -f "$JOB/exit-status" "$JOB/output.log"
SHARE=()
# shellcheck disable=SC2054  # the commas are inside qemu's own option values
[ -n "${REPO:-}" ] && SHARE=(-fsdev "local,id=repo,path=$REPO,security_model=none,readonly=on"
                            -device virtio-9p-pci,fsdev=repo,mount_tag=repo)
timeout --foreground -k 5 "$TIMEOUT" qemu-system-x86_64 -accel tcg,thread=multi -cpu max \
  -smp "${SMP:-2}" -m "${MEM:-1024}" -nodefaults -no-user-config -display none -nic none \
  -no-reboot -monitor none -serial file:"$JOB/serial.log" \
  -kernel "$KERNEL" -initrd "$ROOTFS/boot/initrd.img-$KVER" \
  -append "console=ttyS0 root=root rootfstype=9p rootflags=trans=virtio,version=9p2000.L,msize=262144,cache=loose ro init=/usr/local/sbin/vmtest-init panic=-1 loglevel=4 mitigations=off" \
  -fsdev local,id=rootfs,path="$ROOTFS",security_model=passthrough,readonly=on \
  -device virtio-9p-pci,fsdev=rootfs,mount_tag=root \
  -fsdev local,id=job,path="$JOB",security_model=none -device virtio-9p-pci,fsdev=job,mount_tag=job \
  "${SHARE[@]}"
qrc=$?
# QEMU exits 0 on SIGTERM too: only the guest's own status counts
if [ $qrc -ne 0 ]; then echo "run-vm.sh: qemu exited $qrc (124: timeout)" >&2; exit 125; fi
[ -f "$JOB/exit-status" ] || { echo "run-vm.sh: the guest wrote no exit status" >&2; exit 126; }
exit "$(cat "$JOB/exit-status")"
