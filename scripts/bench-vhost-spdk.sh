# Sourced by scripts/bench-vhost.sh when SPDK_VHOST=/path/to/spdk/build/bin/vhost is set
# (build it with scripts/build-spdk.sh). Adds SPDK's vhost target to the same run:
#   start_spdk null|malloc  SPDK's vhost app, one reactor pinned to SERVER_CPU, exporting a
#                           null (1 GiB) or malloc (512 MiB) bdev, 4 KiB blocks, as
#                           vhost-user-blk
#   spdk_run_set            the libblkio client's job set against it, or, when libblkio
#                           refuses the server, one "refused" line saying why
#   bdevperf_set            the same jobs driven by SPDK's bdevperf through SPDK's own
#                           vhost-user initiator (virtio-user), against any server; used
#                           when SPDK_BDEVPERF (default: build/examples/bdevperf next to
#                           SPDK_VHOST) exists, so every server is also measured with a
#                           client that SPDK accepts
# SPDK needs hugepages: SPDK_HUGEPAGES (default 1536 x 2 MiB; the vhost app takes
# SPDK_MEM_MB=1024, bdevperf 256, and udm processes running meanwhile may take some too,
# since udm's DMA memory prefers hugepages) are reserved for the run and
# the previous nr_hugepages is restored on exit; hugetlbfs is mounted on /dev/hugepages if
# nothing is, and unmounted again.
SPDK_ROOT=$(cd "$(dirname "$SPDK_VHOST")/../.." && pwd)
SPDK_BDEVPERF=${SPDK_BDEVPERF:-$SPDK_ROOT/build/examples/bdevperf}
SPDK_HUGEPAGES=${SPDK_HUGEPAGES:-1536}
SPDK_MEM_MB=${SPDK_MEM_MB:-1024}
SPDK_OLD_HUGEPAGES=$(cat /proc/sys/vm/nr_hugepages)
SPDK_MOUNTED_HUGETLBFS=

spdk_hugepages_reserve() {
  if ! grep -q hugetlbfs /proc/mounts; then
    mkdir -p /dev/hugepages
    mount -t hugetlbfs nodev /dev/hugepages
    SPDK_MOUNTED_HUGETLBFS=1
  fi
  echo "$SPDK_HUGEPAGES" > /proc/sys/vm/nr_hugepages
  echo "spdk: $(grep HugePages_Total /proc/meminfo) (was $SPDK_OLD_HUGEPAGES)" >&2
}

spdk_cleanup() {
  echo "$SPDK_OLD_HUGEPAGES" > /proc/sys/vm/nr_hugepages
  if [ -n "$SPDK_MOUNTED_HUGETLBFS" ]; then umount /dev/hugepages || true; fi
}

start_spdk() { # null|malloc
  local method=bdev_null_create blocks=262144
  [ "$1" = malloc ] && method=bdev_malloc_create blocks=131072
  cat > "$W/spdk.json" <<JSON
{"subsystems": [
  {"subsystem": "bdev", "config": [
    {"method": "$method", "params": {"name": "b0", "num_blocks": $blocks, "block_size": 4096}}]},
  {"subsystem": "vhost_blk", "config": [
    {"method": "vhost_create_blk_controller",
     "params": {"ctrlr": "spdk.sock", "dev_name": "b0", "cpumask": "$(printf '0x%x' $((1 << SERVER_CPU)))"}}]}
]}
JSON
  rm -f "$W/spdk.sock" "$W/spdk-rpc.sock"
  LD_LIBRARY_PATH=$SPDK_ROOT/build/lib "$SPDK_VHOST" -u -m "$(printf '0x%x' $((1 << SERVER_CPU)))" -s "$SPDK_MEM_MB" -S "$W" \
    -r "$W/spdk-rpc.sock" --json "$W/spdk.json" > "$W/spdk.log" 2>&1 &
  PID=$!
  wait_sock "$W/spdk.sock"
  SOCK=$W/spdk.sock
}

spdk_run_set() { # libblkio's job set, if libblkio accepts the server at all
  if ! taskset -c "$CLIENT_CPU" "$BENCH" --socket "$SOCK" --rw randread --qd 1 --seconds 1 \
      --server-pid "$PID" --label probe > /dev/null 2> "$W/probe.err"; then
    local why
    why=$(tr '\n' ' ' < "$W/probe.err" | sed 's/"/\\"/g')
    echo "{\"label\":\"$LABEL\",\"refused\":\"$why\"}" | tee -a "$RESULTS"
    return 0
  fi
  run_set
}

server_cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

bdevperf_run() { # rw qd: one bdevperf run against $SOCK, one JSON line like udm-vhost-bench's
  # One hugetlbfs file (-g): vhost-user's SET_MEM_TABLE carries at most 8 regions. No
  # auto-examine: an examining module would hold the only virtqueue's channel.
  cat > "$W/bdevperf.json" <<JSON
{"subsystems": [{"subsystem": "bdev", "config": [
  {"method": "bdev_set_options", "params": {"bdev_auto_examine": false}},
  {"method": "bdev_virtio_attach_controller",
   "params": {"name": "v", "trtype": "user", "traddr": "$SOCK", "dev_type": "blk", "vq_count": 1, "vq_size": 256}}]}]}
JSON
  local hz t0 c0 t1 c1
  hz=$(getconf CLK_TCK)
  LD_LIBRARY_PATH=$SPDK_ROOT/build/lib "$SPDK_BDEVPERF" -u -g -m "$(printf '0x%x' $((1 << CLIENT_CPU)))" -s 256 -r "$W/bdevperf-rpc.sock" \
    --json "$W/bdevperf.json" -q "$2" -o 4096 -w "$1" -t "$SECS" -l > "$W/bdevperf.out" 2>&1 &
  local bp=$!
  # Server CPU over the middle of the run (start-up and attach, about 0.7 s, excluded),
  # as a fraction of the wall time.
  sleep 1.5
  t0=$(date +%s.%N); c0=$(server_cpu_ticks "$PID")
  sleep $((SECS - 1))
  t1=$(date +%s.%N); c1=$(server_cpu_ticks "$PID")
  wait "$bp" || { echo "bdevperf failed against $LABEL:" >&2; tail -20 "$W/bdevperf.out" >&2; return 0; }
  python3 - "$W/bdevperf.out" "$LABEL" "$1" "$2" "$SECS" "$c0" "$c1" "$t0" "$t1" "$hz" <<'PY' | tee -a "$RESULTS"
import json, re, sys
out, label, rw, qd, secs = open(sys.argv[1]).read(), *sys.argv[2:6]
c0, c1, t0, t1, hz = map(float, sys.argv[6:])
cpu_frac = (c1 - c0) / hz / (t1 - t0)
total = re.search(r"Total\s*:\s+([\d.]+)\s+([\d.]+)", out)
pct = {float(m[0]): float(m[1]) for m in re.findall(r"([\d.]+)%\s*:\s*([\d.]+)us", out)}
def at(p):
    return next((v for k, v in sorted(pct.items()) if k >= p), None)
iops, frac = float(total[1]), float(cpu_frac)
print(json.dumps({"label": label, "rw": {"randread": "RandRead", "randwrite": "RandWrite"}[rw],
                  "qd": int(qd), "poll": False, "iops": round(iops), "p50_us": at(50.0),
                  "p99_us": at(99.0), "server_cpu_s": round(frac * float(secs), 2),
                  "seconds": float(secs), "iops_per_server_cpu_s": round(iops / frac) if frac else None}))
PY
}

bdevperf_set() { # SPDK's client over the same jobs (bdevperf always polls; no QD1 --poll twin)
  [ -x "$SPDK_BDEVPERF" ] || return 0
  local label=$LABEL
  LABEL="bdevperf->$label"
  for job in "randread 1" "randread 32" "randread 128" "randwrite 32"; do
    set -- $job
    bdevperf_run "$1" "$2"
  done
  LABEL=$label
}

spdk_hugepages_reserve
trap 'cleanup; spdk_cleanup' EXIT

# SPDK_ROUNDS=N: instead of the full run, N interleaved rounds of bdevperf randread at QD32
# and QD1 against spdk, udm-busy and udm-event on null (udm null:1G,read-zeroes=off: SPDK's
# null bdev does not touch buffers either) then on RAM (SPDK malloc,
# udm mem:512M) devices (so that the load other
# users put on a shared machine falls on every server alike), then the median (and best
# IOPS) per row.
if [ -n "${SPDK_ROUNDS:-}" ]; then
  for round in $(seq "$SPDK_ROUNDS"); do
    for pair in "spdk null" "udm-busy null:1G,read-zeroes=off" "udm-event null:1G,read-zeroes=off" \
      "spdk malloc" "udm-busy mem:512M" "udm-event mem:512M"; do
      set -- $pair
      LABEL="bdevperf->$1/${2%%:*}"
      if [ "$1" = spdk ]; then start_spdk "$2"; else start_udm "$2" "${1#udm-}"; fi
      bdevperf_run randread 32
      bdevperf_run randread 1
      stop
    done
  done
  python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = {}
for l in open(sys.argv[1]):
    r = json.loads(l)
    rows.setdefault((r["label"], r["qd"]), []).append(r)
print("| server/backend (bdevperf client) | workload | rounds | median IOPS | best IOPS | median p99 us | median IOPS per server CPU-s |")
print("|---|---|---:|---:|---:|---:|---:|")
for (label, qd), rs in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    med = lambda k: statistics.median(r[k] for r in rs)
    print(f"| {label} | randread QD{qd} | {len(rs)} | {med('iops'):,.0f} | {max(r['iops'] for r in rs):,.0f} | {med('p99_us'):.1f} | {med('iops_per_server_cpu_s'):,.0f} |")
PY
  exit 0
fi
