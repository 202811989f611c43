#!/usr/bin/env bash
# Installs the host packages udm's tests and benchmarks use. Idempotent.
set -euo pipefail
need=()
for p in qemu-system-x86 qemu-utils fio xz-utils cpio busybox-static; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # qemu-system-x86 and qemu-utils in one command: installing the first alone removes
  # the newer qemu-utils some images ship, leaving no qemu-img.
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
