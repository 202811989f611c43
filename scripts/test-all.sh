#!/usr/bin/env bash
# The whole udm test suite on a fresh Debian 12 machine: installs what the tests need
# (Debian packages, a guest kernel for the QEMU tests), then runs format and lint checks
# and every test, including the ones that boot QEMU guests. Needs root for apt and VFIO.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-host.sh

echo "== rustfmt"; cargo fmt --all -- --check
echo "== clippy"; cargo clippy --workspace --all-targets --release -- -D warnings
echo "== build"; cargo build --workspace --release --bins
echo "== tests"; cargo test --workspace --release -- --test-threads=2
