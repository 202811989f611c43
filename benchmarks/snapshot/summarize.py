#!/usr/bin/env python3
"""Medians of the snapshot benchmark runs (see run.sh): IOPS, MB/s, and IOPS per busy
CPU-second (robust when the machine is shared), with the ratios BENCHMARKS.md quotes."""
import glob, json, os, statistics, sys

out = sys.argv[1]
CHUNKS = 262144  # the first-touch origin: 1 GiB in 4 KiB chunks
runs = {}
copies = {}
for path in glob.glob(os.path.join(out, "*.json")):
    name = os.path.basename(path).rsplit(".", 2)[0]
    with open(path) as f:
        r = json.load(f)
    busy = r["cpu"]["user_s"] + r["cpu"]["sys_s"]
    runs.setdefault(name, []).append((r["iops"], r["mb_per_s"], r["iops"] * r["seconds"] / busy if busy else 0.0))
    if name.startswith("first-touch-"):
        # Uniform random 4 KiB writes over C chunks: after N writes, C*(1-(1-1/C)^N)
        # distinct chunks were copied (once per snapshot).
        n_writes = r["write"]["ios"]
        distinct = CHUNKS * (1 - (1 - 1 / CHUNKS) ** n_writes)
        copies.setdefault(name, []).append((distinct * 4096 / r["seconds"] / 1e6, distinct / n_writes))

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
    k = f"first-touch-{n}"
    if k in copies:
        rate = statistics.median(c[0] for c in copies[k]) * n
        frac = statistics.median(c[1] for c in copies[k])
        print(f"first touch, {n} snapshot(s): {med[k][1]:.1f} MB/s of writes, {frac:.0%} of them first touches; "
              f"copy-out {rate:.1f} MB/s (all snapshots); raw device write {med['raw-write'][1]:.1f} MB/s")
print(f"snapshot read / linear read: IOPS {ratio('snap-read', 'linear-read', 0):.2f}, per cpu-s {ratio('snap-read', 'linear-read', 2):.2f}")
