#!/usr/bin/env bash
# Reproduces the figures in BENCHMARKS.md: `udm bench` on null and mem (4 KiB randread,
# one thread, QD 1/32/128), and the io_uring file backend beside fio (ioengine=io_uring,
# direct=1, same file, bs, qd, one job) on an ext4 file, QD 1 and 32.
# Usage: bash scripts/benchmarks.sh [image-path-on-ext4] (default /var/tmp/udm-bench/disk.img)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v fio >/dev/null || bash scripts/setup-host.sh
cargo build --release -p udm-server >/dev/null 2>&1
UDM=target/release/udm
IMG=${1:-/var/tmp/udm-bench/disk.img}
RAM_TIME=${RAM_TIME:-5}
FILE_TIME=${FILE_TIME:-10}
ROUNDS=${ROUNDS:-2}

udm_json() { RUST_LOG=error "$UDM" bench "$@" --json; }
field() { python3 -c "import json,sys; r=json.load(sys.stdin); print($1)"; }

echo "Run of $(date -u '+%F %H:%M UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg), on $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r)"
echo
echo "| device | rw | bs | qd | IOPS | p50 us | p99 us | p99.9 us | CPU s/s |"
echo "|---|---|---|---|---|---|---|---|---|"
for dev in null:1G mem:1G; do
  for qd in 1 32 128; do
    udm_json --device "$dev" --rw randread --bs 4k --qd "$qd" --time "$RAM_TIME" | field \
      "f\"| $dev | randread | 4k | $qd | {r['iops']/1e6:.2f}M | {r['read']['lat_us']['p50']:.2f} | {r['read']['lat_us']['p99']:.2f} | {r['read']['lat_us']['p99_9']:.2f} | {(r['cpu']['user_s']+r['cpu']['sys_s'])/r['seconds']:.2f} |\""
  done
done

mkdir -p "$(dirname "$IMG")"
if [ ! -f "$IMG" ] || [ "$(stat -c %s "$IMG")" -lt $((1 << 30)) ]; then
  # Real data everywhere: O_DIRECT reads of holes would never reach the disk.
  fio --name=prefill --filename="$IMG" --rw=write --bs=1M --direct=1 --size=1G --ioengine=io_uring --output=/dev/null
fi
echo
echo "File: $IMG ($(df -T "$IMG" | awk 'NR==2 {print $2}') on $(df "$IMG" | awk 'NR==2 {print $1}'), 1 GiB, O_DIRECT), 4k randread, one job/thread, ${FILE_TIME}s per run, $ROUNDS rounds alternating; load average now $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "udm busy = busy-polling (default); udm wait = \`--wait\` (sleeps in io_uring_enter like fio). CPU % = CPU time / wall time."
echo
echo "| qd | round | fio IOPS | fio clat p50 us | fio CPU % | udm busy IOPS | p50 us | CPU % | udm wait IOPS | p50 us | CPU % | busy/fio | wait/fio |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
udm_file() {
  udm_json --device "file:$IMG" --rw randread --bs 4k --qd "$1" --time "$FILE_TIME" "${@:2}" |
    field "' '.join(str(x) for x in [r['iops'], r['read']['lat_us']['p50'], 100 * (r['cpu']['user_s'] + r['cpu']['sys_s']) / r['seconds']])"
}
for qd in 1 32; do
  for round in $(seq 1 "$ROUNDS"); do
    f=$(fio --name=cmp --filename="$IMG" --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth="$qd" \
          --numjobs=1 --time_based --runtime="$FILE_TIME" --size=1G --output-format=json 2>/dev/null |
        field "' '.join(str(x) for x in [r['jobs'][0]['read']['iops'], r['jobs'][0]['read']['clat_ns']['percentile']['50.000000']/1e3, r['jobs'][0]['usr_cpu'] + r['jobs'][0]['sys_cpu']])")
    b=$(udm_file "$qd")
    w=$(udm_file "$qd" --wait)
    read -r fi fp50 fcpu <<<"$f"
    read -r bi bp50 bcpu <<<"$b"
    read -r wi wp50 wcpu <<<"$w"
    python3 -c "print(f'| $qd | $round | {$fi:.0f} | {$fp50:.1f} | {$fcpu:.0f} | {$bi:.0f} | {$bp50:.1f} | {$bcpu:.0f} | {$wi:.0f} | {$wp50:.1f} | {$wcpu:.0f} | {$bi/$fi:.2f} | {$wi/$fi:.2f} |')"
  done
done
