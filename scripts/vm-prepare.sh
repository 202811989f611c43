#!/usr/bin/env bash
# Prepares what udm's QEMU guests need (see tests/src/vm/README.md). Idempotent: a second
# run only checks that everything is already there.
#
#   * QEMU (qemu-system-x86 and qemu-utils, in one apt command: installing the first alone
#     removes the newer qemu-utils some images ship, leaving no qemu-img);
#   * the Debian kernel that `linux-image-amd64` names, unpacked into the cache:
#     vmlinuz, the uncompressed vmlinux (boots directly through PVH, about twice as fast),
#     and its modules (plain .ko files, no modules.dep: the harness reads `depends=`);
#   * busybox (static) for the guests' userland;
#   * dmsetup and its libraries on the host, so guests can carry them in for kernel
#     dm-snapshot interoperability tests.
#
# The cache lives in $UDM_VM_CACHE (default /var/cache/udm-vm); the harness reads the same
# variable. Layout:
#   $UDM_VM_CACHE/kernel-version     e.g. 6.1.0-48-amd64
#   $UDM_VM_CACHE/vmlinuz            the compressed kernel (bzImage)
#   $UDM_VM_CACHE/vmlinux            the uncompressed ELF kernel (when extractable)
#   $UDM_VM_CACHE/modules/           lib/modules/<version> of that kernel
#   $UDM_VM_CACHE/busybox            a static busybox
set -euo pipefail

CACHE="${UDM_VM_CACHE:-/var/cache/udm-vm}"
mkdir -p "$CACHE"
export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -o DPkg::Lock::Timeout=600 -y -qq)

# --- host packages ----------------------------------------------------------------
need=()
for p in qemu-system-x86 qemu-utils dmsetup binutils cpio xz-utils zstd; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
# qemu-img must come from the same QEMU as qemu-system-x86_64 (guest images, the
# `qemu-img bench` peer). The image may ship a newer qemu-utils (backports) that breaks
# Debian 12's qemu-system-common, so both are pinned to qemu-system-x86's candidate.
sys_ver=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
utl_ver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
if [ ${#need[@]} -gt 0 ] || [ -z "$sys_ver" ] || [ "$sys_ver" != "$utl_ver" ]; then
  "${APT[@]}" update >/dev/null || true
  cand=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  pkgs=()
  for p in "${need[@]}"; do
    case "$p" in qemu-system-x86 | qemu-utils) ;; *) pkgs+=("$p") ;; esac
  done
  if [ -n "$cand" ] && [ "$cand" != "(none)" ]; then
    pkgs+=("qemu-system-x86=$cand" "qemu-utils=$cand")
  else
    pkgs+=(qemu-system-x86 qemu-utils)
  fi
  # --allow-downgrades: replaces a backported qemu-utils by the matching one.
  "${APT[@]}" --allow-downgrades install "${pkgs[@]}" >/dev/null
fi

# --- guest kernel -------------------------------------------------------------------
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
  echo "vm-prepare: apt-cache does not know linux-image-amd64; run apt-get update" >&2
  exit 1
fi
ver=${pkg#linux-image-}
if [ "$(cat "$CACHE/kernel-version" 2>/dev/null)" != "$ver" ] || [ ! -f "$CACHE/vmlinuz" ] || [ ! -d "$CACHE/modules/kernel" ]; then
  work=$(mktemp -d "$CACHE/.kernel.XXXXXX")
  chmod 755 "$work" # apt-get download runs as _apt
  (cd "$work" && apt-get download -qq "$pkg")
  dpkg-deb -x "$work"/"$pkg"_*.deb "$work/root"
  rm -rf "$CACHE/modules" "$CACHE/vmlinuz" "$CACHE/vmlinux"
  mv "$work/root/boot/vmlinuz-$ver" "$CACHE/vmlinuz"
  mv "$work/root/lib/modules/$ver" "$CACHE/modules"
  rm -rf "$work"
  echo "$ver" > "$CACHE/kernel-version"
fi

# The uncompressed kernel: find the compressed payload inside the bzImage by its magic
# number, decompress from there and keep the result if it is an ELF file (the method of
# the kernel tree's scripts/extract-vmlinux).
is_elf() { [ "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' \n')" = '177ELF' ]; }
if [ ! -f "$CACHE/vmlinux" ] || ! is_elf "$CACHE/vmlinux"; then
  try_extract() { # magic-as-grep-pattern decompressor...
    local magic=$1; shift
    local off
    for off in $(LC_ALL=C grep -aboP "$magic" "$CACHE/vmlinuz" | cut -d: -f1); do
      tail -c +"$((off + 1))" "$CACHE/vmlinuz" | "$@" > "$CACHE/vmlinux.tmp" 2>/dev/null || true
      if is_elf "$CACHE/vmlinux.tmp"; then mv "$CACHE/vmlinux.tmp" "$CACHE/vmlinux"; return 0; fi
    done
    rm -f "$CACHE/vmlinux.tmp"
    return 1
  }
  try_extract '\xfd7zXZ\x00' xz -dc ||
    try_extract '\x28\xb5\x2f\xfd' zstd -dc ||
    try_extract '\x1f\x8b\x08' gzip -dc ||
    echo "vm-prepare: could not extract vmlinux from vmlinuz; guests boot the bzImage (slower)" >&2
fi

# --- busybox ------------------------------------------------------------------------
if [ ! -x "$CACHE/busybox" ]; then
  work=$(mktemp -d "$CACHE/.busybox.XXXXXX")
  chmod 755 "$work"
  (cd "$work" && apt-get download -qq busybox-static)
  dpkg-deb -x "$work"/busybox-static_*.deb "$work/root"
  install -m 0755 "$work/root/bin/busybox" "$CACHE/busybox"
  rm -rf "$work"
fi

echo "vm-prepare: kernel $(cat "$CACHE/kernel-version") in $CACHE ($(ls "$CACHE" | tr '\n' ' '))"
