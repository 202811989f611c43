#!/usr/bin/env bash
# Reproduces the mapping figures in BENCHMARKS.md with `udm bench`, each mapped device
# beside its raw backend in the same run, alternating, ROUNDS times (default 3):
#  linear:  one linear segment over null:1G and over mem:1G vs the raw backend,
#           4k randread, QD 128, 1 thread;
#  striped: striped (4 x mem:256M, 64 KiB chunks) vs one mem:1G, 4k randread, QD 32,
#           1 and 2 threads (IOPS and the CPU the threads got);
#  lookup:  the criterion lookup bench (1 to 100,000 segments).
# Usage: bash scripts/bench-mapping.sh
#   TIME=5 ROUNDS=3 PARTS="linear striped" (add "lookup" for criterion) override.
# CPU = CPU seconds the bench process got per wall second (the machine may be shared);
# ns/IO = CPU nanoseconds per request (lower is better); per-CPU = IOPS / CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p udm-server >/dev/null 2>&1
UDM=$PWD/target/release/udm
TIME=${TIME:-5}
ROUNDS=${ROUNDS:-3}
PARTS=${PARTS:-linear striped}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
echo "0 2097152 linear disk0 0" >"$T/linear.table"
echo "0 2097152 striped 4 128 s0 0 s1 0 s2 0 s3 0" >"$T/striped.table"

# Prints "IOPS CPU" of one run; warns on stderr when the run took much longer than
# TIME (a thread that got no CPU for a while: its IOPS are meaningless) or failed.
iops() { RUST_LOG=error "$UDM" bench "$@" --rw randread --bs 4k --time "$TIME" --json |
  python3 -c "
import json, sys
r = json.load(sys.stdin)
if r['seconds'] > 1.5 * $TIME or r['failure']:
    print(f'warning: run of {r[\"seconds\"]:.1f} s, failure {r[\"failure\"]}: $*', file=sys.stderr)
print(r['iops'], (r['cpu']['user_s'] + r['cpu']['sys_s']) / r['seconds'])"; }
has() { [[ " $PARTS " == *" $1 "* ]]; }

echo "Run of $(date -u '+%F %H:%M UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg), on $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo '+uncommitted')"
echo
if has linear; then
  echo "| backend | round | raw IOPS | raw CPU | raw ns/IO | linear IOPS | linear CPU | linear ns/IO | linear/raw IOPS | linear/raw per-CPU |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  for be in null:1G mem:1G; do
    for round in $(seq 1 "$ROUNDS"); do
      # Odd rounds run raw first, even rounds linear first: each run allocates its RAM
      # disk afresh, and what the previous run left in the page allocator (THP supply)
      # must not favour one side.
      if [ $((round % 2)) = 1 ]; then
        read -r ri rc <<<"$(iops --device "$be" --qd 128)"
        read -r li lc <<<"$(iops --device "dm:$T/linear.table" --device "disk0=$be" --qd 128)"
      else
        read -r li lc <<<"$(iops --device "dm:$T/linear.table" --device "disk0=$be" --qd 128)"
        read -r ri rc <<<"$(iops --device "$be" --qd 128)"
      fi
      python3 -c "print(f'| $be | $round | {$ri/1e6:.2f}M | {$rc:.2f} | {$rc/$ri*1e9:.0f} | {$li/1e6:.2f}M | {$lc:.2f} | {$lc/$li*1e9:.0f} | {$li/$ri:.3f} | {($li/$lc)/($ri/$rc):.3f} |')"
    done
  done
  echo "(load average after: $(cut -d' ' -f1-3 /proc/loadavg))"
  echo
fi
if has striped; then
  echo "| device | threads | round | IOPS | CPU s/s | IOPS per CPU-second |"
  echo "|---|---|---|---|---|---|"
  STRIPES=(--device "dm:$T/striped.table" --device s0=mem:256M --device s1=mem:256M --device s2=mem:256M --device s3=mem:256M)
  for round in $(seq 1 "$ROUNDS"); do
    for th in 1 2; do
      read -r i c <<<"$(iops --device mem:1G --qd 32 --threads "$th")"
      python3 -c "print(f'| mem:1G | $th | $round | {$i/1e6:.2f}M | {$c:.2f} | {$i/$c/1e6:.2f}M |')"
      read -r i c <<<"$(iops "${STRIPES[@]}" --qd 32 --threads "$th")"
      python3 -c "print(f'| striped 4 x mem:256M, 64k chunks | $th | $round | {$i/1e6:.2f}M | {$c:.2f} | {$i/$c/1e6:.2f}M |')"
    done
  done
  echo "(load average after: $(cut -d' ' -f1-3 /proc/loadavg))"
  echo
fi
if has lookup; then
  cargo bench -p udm-mapping --bench lookup -- --warm-up-time 1 --measurement-time 3 2>/dev/null | grep -E '^(lookup|read_4k)/|time:'
fi
