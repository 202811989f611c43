#!/usr/bin/env bash
# Installs the host packages udm's tests and benchmarks use, and what the QEMU guests
# need (scripts/vm-prepare.sh: QEMU, a guest kernel, busybox, dmsetup), and mkfs.ext4 / mkfs.xfs
# for the snapshot tests that loop-mount real file systems. Idempotent.
set -euo pipefail
need=()
for p in fio xz-utils cpio busybox-static e2fsprogs xfsprogs; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${need[@]}" >/dev/null
fi
# QEMU (qemu-system-x86 and qemu-utils together, same version), the guest kernel and its
# modules, busybox: cached in $UDM_VM_CACHE (default /var/cache/udm-vm).
bash "$(dirname "$0")/vm-prepare.sh"
