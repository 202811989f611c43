#!/usr/bin/env bash
# Builds SPDK's vhost target (build/bin/vhost) for the vhost-user-blk benchmark
# (scripts/bench-vhost.sh with SPDK_VHOST=...). A benchmark tool, not part of CI.
#
# SPDK's dpdk/isa-l/... git submodules cannot be fetched here, so SPDK is built against
# Debian 12's DPDK 22.11 (libdpdk-dev, found through pkg-config) and without ISA-L
# (configure turns it off when nasm is absent; it only accelerates CRC/crypto/compression,
# none of which the vhost-blk path over null/malloc bdevs uses). configure insists that
# the isa-l submodule directory exists, so it is filled from an ISA-L mirror when one is
# given, else with an empty placeholder holding only autogen.sh.
#
#   bash scripts/build-spdk.sh [SPDK_REPO] [DEST] [TAG] [ISAL_REPO]
#     SPDK_REPO  path or URL of an SPDK git repository (default /work/.mirror/spdk+spdk/repo)
#     DEST       build directory (default /work/spdk-src)
#     TAG        SPDK release tag (default v24.09: its env_dpdk accepts DPDK >= 21.11, and
#                its vhost library still builds against DPDK 22.11's rte_vhost)
#     ISAL_REPO  optional ISA-L repository (e.g. /work/.mirror/spdk+isa-l/repo)
# Prints the path of the vhost binary on success. Idempotent: re-running reuses DEST.
set -euo pipefail
SPDK_REPO=${1:-/work/.mirror/spdk+spdk/repo}
DEST=${2:-/work/spdk-src}
TAG=${3:-v24.09}
ISAL_REPO=${4:-/work/.mirror/spdk+isa-l/repo}
JOBS=${JOBS:-2}

export DEBIAN_FRONTEND=noninteractive
DEPS=(build-essential pkg-config python3 libdpdk-dev libnuma-dev libssl-dev uuid-dev
  libaio-dev libncurses-dev libjson-c-dev libcunit1-dev)
missing=()
for p in "${DEPS[@]}"; do dpkg -s "$p" > /dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if command -v nasm > /dev/null; then
  echo "nasm is installed: SPDK's configure would then build ISA-L from the isa-l submodule;" >&2
  echo "this script builds without ISA-L, so remove nasm (apt-get remove nasm) or build by hand." >&2
  exit 1
fi

if [ ! -d "$DEST/.git" ]; then
  git clone --no-checkout "$SPDK_REPO" "$DEST"
fi
cd "$DEST"
if [ "$(git describe --tags --exact-match 2> /dev/null || true)" != "$TAG" ]; then
  git checkout -q "$TAG"
fi

if [ ! -f isa-l/autogen.sh ]; then
  rm -rf isa-l
  if [ -d "$ISAL_REPO" ]; then
    git clone -q "$ISAL_REPO" isa-l
  else
    mkdir -p isa-l
    printf '#!/bin/sh\n# placeholder: SPDK built without ISA-L\n' > isa-l/autogen.sh
  fi
fi

# SPDK's env_dpdk refuses at start-up any DPDK 22.11 LTS release after 22.11.4 ("DPDK LTS
# version 22.11.11 not supported"), because its PCI code copies DPDK's private PCI bus
# structs and later point releases were never re-checked. Debian 12 ships 22.11.11 and
# no SPDK release (up to v25.09 and master) lifts that gate, so it is relaxed to accept
# any 22.11.x. The benchmark runs the apps with --no-pci (-u): no PCI device is probed,
# so those private structs are never used.
if ! grep -q 'if (minor > 11) {' lib/env_dpdk/pci_dpdk.c; then
  sed -i 's/if (minor > 4) {/if (minor > 11) {/' lib/env_dpdk/pci_dpdk.c
  grep -q 'if (minor > 11) {' lib/env_dpdk/pci_dpdk.c
fi

CONFIGURE_FLAGS=(--with-dpdk --disable-tests --disable-unit-tests --disable-examples
  --without-crypto --without-fio --without-xnvme --without-vfio-user --without-rdma
  --without-ocf --without-uring --without-fuse --without-iscsi-initiator --without-nvme-cuse
  --without-ublk --without-sma --without-avahi --without-golang --without-idxd
  --with-vhost --with-virtio)
# (Against a packaged DPDK, configure turns shared libraries on by itself.)
if [ ! -f mk/config.mk ] || [ "$(cat .udm-configure-flags 2> /dev/null)" != "${CONFIGURE_FLAGS[*]}" ]; then
  ./configure "${CONFIGURE_FLAGS[@]}"
  echo "${CONFIGURE_FLAGS[*]}" > .udm-configure-flags
fi

# Only the libraries and modules the vhost app links, then the app itself (no other apps,
# tests or examples).
# (The top-level lib/module targets forward their own name as the goal to the sub-makes,
# so the directories are built directly.)
make build_dir include/spdk/config.h
nice -n 19 make -j"$JOBS" -C lib
nice -n 19 make -j"$JOBS" -C module all
nice -n 19 make -j"$JOBS" -C app/vhost
# bdevperf with SPDK's own vhost-user initiator (bdev_virtio_attach_controller
# --trtype user): a second client that can drive every server, see bench-vhost.sh.
nice -n 19 make -j"$JOBS" -C examples/bdev/bdevperf
ls -la "$DEST/build/bin/vhost" "$DEST/build/examples/bdevperf" >&2
echo "$DEST/build/bin/vhost"
