#!/usr/bin/env bash
# Writes the stack files the snapshot benchmarks use: an origin of $1 sectors with 0, 1
# or 4 snapshots (chunk $2 sectors), each COW on its own RAM backend cowN, plus a
# snapshot-read stack. Usage: gen-stacks.sh <origin sectors> <chunk> <cow sectors> <dir>
set -euo pipefail
origin=$1 chunk=$2 cow=$3 dir=$4
mkdir -p "$dir"
for n in 0 1 4; do
  f="$dir/origin-$n.stack"
  echo "vol-real: 0 $origin linear disk 0" > "$f"
  for i in $(seq 1 "$n"); do
    echo "s$i-cow: 0 $cow linear cow$i 0" >> "$f"
    echo "s$i: 0 $origin snapshot vol-real s$i-cow P $chunk" >> "$f"
  done
  if [ "$n" = 0 ]; then
    echo "vol: 0 $origin linear vol-real 0" >> "$f"
  else
    echo "vol: 0 $origin snapshot-origin vol-real" >> "$f"
  fi
done
f="$dir/snap-read.stack"
{
  echo "vol-real: 0 $origin linear disk 0"
  echo "s1-cow: 0 $cow linear cow1 0"
  echo "vol: 0 $origin snapshot-origin vol-real"
  echo "s1: 0 $origin snapshot vol-real s1-cow P $chunk"
} > "$f"
f="$dir/linear.stack"
echo "lin: 0 $origin linear disk 0" > "$f"
