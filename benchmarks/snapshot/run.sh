#!/usr/bin/env bash
# The snapshot benchmarks of BENCHMARKS.md ("Snapshots"). Every configuration runs
# $REPS times, interleaved with its peers, so that load on the (shared) machine hits all
# of them alike; summarize.py prints medians of IOPS and of IOPS per busy CPU-second.
# Usage: benchmarks/snapshot/run.sh [reps] [seconds]   (after cargo build --release -p udm-server)
set -euo pipefail
cd "$(dirname "$0")/../.."
REPS=${1:-3} T=${2:-2} TF=${TF:-500ms}
U=target/release/udm
OUT=${OUT:-/tmp/udm-snapshot-bench}
mkdir -p "$OUT" && rm -f "$OUT"/*.json
# First touch: a 1 GiB origin (262144 chunks; RAM disks are faulted in up front, so the
# sizes stay modest) and short runs, so that most 4 KiB random writes land on a chunk
# not yet copied: they run for $TF (default 0.5 s); summarize.py reports the share of
# first touches and the copy-out rate it implies. Rewrite: a 256 MiB origin fully written by --verify's
# fill pass first (every chunk copied), then measured.
benchmarks/snapshot/gen-stacks.sh 2097152 8 2306048 "$OUT/big" >/dev/null
benchmarks/snapshot/gen-stacks.sh 524288 8 589824 "$OUT/small" >/dev/null
cows() { for i in $(seq 1 "$1"); do echo "--device cow$i=mem:$2"; done; }
run() { # name, args...
  local name=$1; shift
  local t=$T
  case $name in first-touch-*) t=$TF ;; esac
  RUST_LOG=error $U bench "$@" --bs 4k --qd 32 --time "$t" --json > "$OUT/$name.$rep.json"
}
for rep in $(seq 1 "$REPS"); do
  for n in 0 1 4; do
    run "first-touch-$n" --device disk=mem:1G $(cows $n 1126M) --device "dm:$OUT/big/origin-$n.stack" --rw randwrite
    run "rewrite-$n" --device disk=mem:256M $(cows $n 288M) --device "dm:$OUT/small/origin-$n.stack" --rw randwrite --verify
  done
  run "raw-write" --device disk=mem:1G --device "dm:$OUT/big/linear.stack" --rw randwrite
  run "linear-read" --device disk=mem:1G --device "dm:$OUT/big/linear.stack" --rw randread
  run "snap-read" --device disk=mem:1G --device cow1=mem:1126M --device "dm:$OUT/big/snap-read.stack" --rw randread
done
python3 benchmarks/snapshot/summarize.py "$OUT"
