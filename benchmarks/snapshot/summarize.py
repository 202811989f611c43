#!/usr/bin/env python3
"""Medians of the snapshot benchmark runs (see run.sh): IOPS, MB/s, and IOPS per busy
CPU-second (robust when the machine is shared), with the ratios BENCHMARKS.md quotes."""
import glob, json, os, statistics, sys

out = sys.argv[1]
runs = {}
for path in glob.glob(os.path.join(out, "*.json")):
    name = os.path.basename(path).rsplit(".", 2)[0]
    with open(path) as f:
        r = json.load(f)
    busy = r["cpu"]["user_s"] + r["cpu"]["sys_s"]
    runs.setdefault(name, []).append((r["iops"], r["mb_per_s"], r["iops"] * r["seconds"] / busy if busy else 0.0))

med = {k: tuple(statistics.median(x[i] for x in v) for i in range(3)) for k, v in runs.items()}
order = ["raw-write"] + [f"first-touch-{n}" for n in (0, 1, 4)] + [f"rewrite-{n}" for n in (0, 1, 4)] + ["linear-read", "snap-read"]
print(f"{'config':16} {'IOPS':>10} {'MB/s':>8} {'IOPS/cpu-s':>11}  (median of {len(next(iter(runs.values())))})")
for k in order:
    if k in med:
        i, m, c = med[k]
        print(f"{k:16} {i:10.0f} {m:8.1f} {c:11.0f}")

def ratio(a, b, idx):
    return med[a][idx] / med[b][idx] if a in med and b in med and med[b][idx] else float("nan")

print()
for n in (1, 4):
    print(f"rewrite with {n} snapshot(s) / no snapshot: IOPS {ratio(f'rewrite-{n}', 'rewrite-0', 0):.2f}, "
          f"per cpu-s {ratio(f'rewrite-{n}', 'rewrite-0', 2):.2f}")
for n in (1, 4):
    # Each first-touch write copies one 4 KiB chunk per snapshot: copy-out MB/s = writes * 4 KiB * n.
    if f"first-touch-{n}" in med:
        copy = med[f"first-touch-{n}"][1] * n
        print(f"first touch, {n} snapshot(s): {med[f'first-touch-{n}'][1]:.1f} MB/s of writes, copy-out {copy:.1f} MB/s; "
              f"raw device write {med['raw-write'][1]:.1f} MB/s")
print(f"snapshot read / linear read: IOPS {ratio('snap-read', 'linear-read', 0):.2f}, per cpu-s {ratio('snap-read', 'linear-read', 2):.2f}")
