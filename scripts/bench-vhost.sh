#!/usr/bin/env bash
# Same-run comparison of vhost-user-blk servers with one libblkio client
# (target/release/udm-vhost-bench): `udm serve` (event and busy-poll mode) against
# qemu-storage-daemon's vhost-user-blk export, over a null device and over a file on
# tmpfs. Server pinned to one core, client to another. Prints JSON lines, then a table.
#   cargo build --release -p udm-server --bin udm -p udm-tests --bin udm-vhost-bench
#   bash scripts/bench-vhost.sh            # SECS=5 SERVER_CPU=1 CLIENT_CPU=0
#   ROUNDS=5 SECS=3 bash scripts/bench-vhost.sh   # interleaved headline rounds only
#   IDLE_POLL_US=32 ...     # udm exports with another polling window than the default
# With SPDK_VHOST=/path/to/spdk/build/bin/vhost (scripts/build-spdk.sh) the run also
# measures SPDK's vhost target (null and malloc bdevs, beside udm null: and mem:), and,
# when SPDK's bdevperf is built, every server again with SPDK's own vhost-user client;
# see scripts/bench-vhost-spdk.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
T=target/release
UDM=$T/udm
BENCH=$T/udm-vhost-bench
SECS=${SECS:-5}
SERVER_CPU=${SERVER_CPU:-1}
CLIENT_CPU=${CLIENT_CPU:-0}
W=$(mktemp -d)
IMG=/dev/shm/udm-bench.img
RESULTS=${RESULTS:-$W/results.jsonl}
PID=
stop() { if [ -n "$PID" ]; then kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=; fi; }
cleanup() { stop; rm -rf "$W" "$IMG"; }
trap cleanup EXIT
truncate -s 1G "$IMG"
dd if=/dev/zero of="$IMG" bs=1M count=1024 conv=notrunc status=none

wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "no socket $1" >&2; exit 1; }

start_udm() { # spec poll
  cat > "$W/udm.toml" <<TOML
control = "$W/udm.ctl"
[[backend]]
name = "b0"
spec = "$1"
[[export]]
name = "b0"
device = "b0"
socket = "$W/udm.sock"
poll = "$2"
cpus = [$SERVER_CPU]
queue_size = 256
${IDLE_POLL_US:+idle_poll_us = $IDLE_POLL_US}
TOML
  rm -f "$W/udm.sock"
  taskset -c "$SERVER_CPU" "$UDM" serve --config "$W/udm.toml" > "$W/udm.log" 2>&1 &
  PID=$!
  wait_sock "$W/udm.sock"
  SOCK=$W/udm.sock
}

start_qsd() { # blockdev options
  rm -f "$W/qsd.sock"
  taskset -c "$SERVER_CPU" qemu-storage-daemon --blockdev "$1" \
    --export "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$W/qsd.sock,writable=on,num-queues=1" \
    > "$W/qsd.log" 2>&1 &
  PID=$!
  wait_sock "$W/qsd.sock"
  SOCK=$W/qsd.sock
}

run_set() { # label
  for job in "randread 1" "randread 1 --poll" "randread 32" "randread 128" "randwrite 32"; do
    set -- $job
    taskset -c "$CLIENT_CPU" "$BENCH" --socket "$SOCK" --rw "$1" --qd "$2" ${3:-} --seconds "$SECS" \
      --server-pid "$PID" --label "$LABEL" | tee -a "$RESULTS"
  done
}

if [ -n "${SPDK_VHOST:-}" ]; then source scripts/bench-vhost-spdk.sh; fi

# ROUNDS=N: instead of the full run, N interleaved rounds of the headline rows (libblkio,
# null without zero fill, 4k QD32 randread and randwrite) against udm (event and busy) and
# qsd, so the load other users put on a shared machine falls on every server alike; then
# the median per row and udm's ratio to qsd.
if [ -n "${ROUNDS:-}" ]; then
  for round in $(seq "$ROUNDS"); do
    for server in udm-event udm-busy qsd; do
      LABEL="$server/null"
      if [ $server = qsd ]; then
        start_qsd "driver=null-co,node-name=n0,size=1073741824,read-zeroes=off"
      else
        start_udm null:1G,read-zeroes=off "${server#udm-}"
      fi
      for rw in randread randwrite; do
        taskset -c "$CLIENT_CPU" "$BENCH" --socket "$SOCK" --rw $rw --qd 32 --seconds "$SECS" \
          --server-pid "$PID" --label "$LABEL" | tee -a "$RESULTS"
      done
      stop
    done
  done
  python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = {}
for l in open(sys.argv[1]):
    if l.startswith("{"):
        r = json.loads(l)
        rows.setdefault((r["rw"], r["label"]), []).append(r)
print("| server/backend | workload | rounds | median IOPS | median p99 us | median IOPS per server CPU-s | per-round IOPS per CPU-s | udm / qsd |")
print("|---|---|---:|---:|---:|---:|---|---:|")
for (rw, label), rs in sorted(rows.items()):
    med = lambda k, rs=rs: statistics.median(r[k] for r in rs)
    q = rows.get((rw, "qsd/null"))
    ratio = med("iops_per_server_cpu_s") / statistics.median(r["iops_per_server_cpu_s"] for r in q) if q else 0
    each = " ".join(f"{r['iops_per_server_cpu_s'] / 1e6:.2f}M" for r in rs)
    print(f"| {label} | {rw.lower()} QD32 | {len(rs)} | {med('iops'):,.0f} | {med('p99_us'):.1f} | {med('iops_per_server_cpu_s'):,.0f} | {each} | {ratio:.2f}x |")
PY
  exit 0
fi

# null: reads leave the buffer as it is on both sides (qsd's null-co default, SPDK's null
# bdev); null-zeroes: both fill every read with zeroes; tmpfs: a RAM file, page cache.
for backend in null null-zeroes tmpfs; do
  if [ $backend = null ]; then
    UDM_SPEC=null:1G,read-zeroes=off
    QSD_DEV="driver=null-co,node-name=n0,size=1073741824,read-zeroes=off"
  elif [ $backend = null-zeroes ]; then
    UDM_SPEC=null:1G
    QSD_DEV="driver=null-co,node-name=n0,size=1073741824,read-zeroes=on"
  else
    UDM_SPEC="file:$IMG,direct=off"
    QSD_DEV="driver=file,filename=$IMG,node-name=n0,cache.direct=off,aio=io_uring"
  fi
  for poll in event busy; do
    LABEL="udm-$poll/$backend"; start_udm "$UDM_SPEC" $poll; run_set; stop
  done
  LABEL="qsd/$backend"; start_qsd "$QSD_DEV"; run_set; stop
  if [ -n "${SPDK_VHOST:-}" ] && [ $backend = null ]; then
    LABEL="spdk/null"; start_spdk null; spdk_run_set; bdevperf_set; stop
    for poll in event busy; do
      LABEL="udm-$poll/null"; start_udm null:1G,read-zeroes=off $poll; bdevperf_set; stop
    done
    LABEL="qsd/null"; start_qsd "$QSD_DEV"; bdevperf_set; stop
  fi
done

if [ -n "${SPDK_VHOST:-}" ]; then # RAM: SPDK's malloc bdev beside udm's mem backend
  for poll in event busy; do
    LABEL="udm-$poll/mem"; start_udm mem:512M $poll; run_set; bdevperf_set; stop
  done
  LABEL="spdk/malloc"; start_spdk malloc; spdk_run_set; bdevperf_set; stop
fi

python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for r in [r for r in rows if "refused" in r]:
    print(f"{r['label']}: libblkio client refused the server: {r['refused']}")
rows = [r for r in rows if "refused" not in r]
print("| server/backend | workload | IOPS | p50 us | p99 us | server CPU s | IOPS per server CPU-s |")
print("|---|---|---:|---:|---:|---:|---:|")
for r in rows:
    w = f"{r['rw'].lower()} QD{r['qd']}" + (" (client polls)" if r['poll'] else "")
    print(f"| {r['label']} | {w} | {r['iops']:,.0f} | {r['p50_us']} | {r['p99_us']} | {r['server_cpu_s']} | {r['iops_per_server_cpu_s']:,.0f} |")
PY
