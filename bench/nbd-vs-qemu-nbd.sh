#!/usr/bin/env bash
# A/B benchmark, in one run: nvstack serve vs qemu-nbd vs nbdkit (file plugin), serving the same backing file on
# /dev/shm, measured by the same client (fio's nbd engine, libnbd):
#   - 4 KiB random read, QD32 (data already in the page cache: "cached data"; nvstack serves it from its own
#     cache, sized to hold the file and warmed by one sequential pass, as every server gets one)
#     over 1 connection, and over 4 connections at once (fio --numjobs=4: what multi-conn clients such as nbdcopy
#     do); with one connection the single fio+libnbd client thread saturates its core before any server does
#   - 128 KiB sequential read, QD8
# Servers run one after another, ROUNDS times (A/B/C alternating; default 2); the medians are compared.
# Usage: bench/nbd-vs-qemu-nbd.sh [SECONDS per run, default 10] [SIZE_MB, default 512]
# Needs: fio (with the nbd engine), qemu-nbd (qemu-utils), nbdkit. Prints one table; exits non-zero if a server
# fails to start or a client run fails.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
size_mb=${2:-512}
for t in fio qemu-nbd nbdkit; do
  command -v "$t" >/dev/null || { echo "bench: $t is missing (apt-get install fio qemu-utils nbdkit)" >&2; exit 1; }
done
fio --enghelp 2>/dev/null | grep -qx '[[:space:]]*nbd' || { echo "bench: this fio has no nbd engine" >&2; exit 1; }
bin=${NVSTACK_BIN:-target/release/nvstack}
[ -x "$bin" ] || cargo build --release -p nvstack >/dev/null
work=$(mktemp -d /tmp/nbd-bench.XXXXXX)
img=/dev/shm/nvstack-bench-$$.img
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work" "$img"; }
trap cleanup EXIT
dd if=/dev/urandom of="$img" bs=1M count="$size_mb" status=none
cat "$img" >/dev/null

wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "bench: port $1 never opened" >&2; return 1; }

run_fio() { # uri rw bs qd [jobs] -> prints "IOPS MiB/s"
  fio --name=b --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" --numjobs="${5:-1}" --group_reporting \
      --size="${size_mb}m" \
      --time_based --runtime="$secs" --ramp_time=1 --output-format=json >"$work/fio.json" 2>"$work/fio.err" \
    || { cat "$work/fio.err" >&2; return 1; }
  python3 -c 'import json,sys; t=open(sys.argv[1]).read(); j=json.loads(t[t.index("{"):])["jobs"][0]["read"]; print("%.0f %.1f" % (j["iops"], j["bw_bytes"]/1048576))' "$work/fio.json"
}

med() { python3 -c 'import sys,statistics; print("%.1f" % statistics.median(map(float, sys.argv[1:])))' "$@"; }
declare -A res
rounds=${ROUNDS:-2}
bench_server() { # name uri
  fio --name=w --ioengine=nbd --uri="$2" --rw=read --bs=128k --iodepth=4 --size="${size_mb}m" >/dev/null 2>&1 || true
  local r r4 s
  r=$(run_fio "$2" randread 4k 32)
  r4=$(run_fio "$2" randread 4k 32 4)
  s=$(run_fio "$2" read 128k 8)
  echo "round $round $1: randread ${r%% *} IOPS (4 connections: ${r4%% *}), seq ${s##* } MiB/s" >&2
  res[$1,rand]+="${r%% *} "
  res[$1,rand4]+="${r4%% *} "
  res[$1,seq]+="${s##* } "
}

for round in $(seq 1 "$rounds"); do
# nvstack serve
"$bin" serve --data-dir "$work/nv" --volume "file:$img" --cache-mb $((size_mb + 64)) --port 10901 ${NVSTACK_SERVE_ARGS:-} >"$work/nv.log" 2>&1 &
pids+=($!); wait_port 10901
bench_server nvstack nbd://127.0.0.1:10901/disk0
kill -INT "${pids[-1]}"; wait "${pids[-1]}" || { echo "bench: nvstack serve did not stop cleanly" >&2; cat "$work/nv.log" >&2; exit 1; }
rm -rf "$work/nv"

# qemu-nbd (raw, no cache layer of its own beyond the page cache; 1 connection per client)
qemu-nbd -f raw -t -b 127.0.0.1 -p 10902 -x disk0 --shared=8 "$img" >"$work/q.log" 2>&1 &
pids+=($!); wait_port 10902
bench_server qemu-nbd nbd://127.0.0.1:10902/disk0
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true

# nbdkit file plugin
nbdkit -f -i 127.0.0.1 -p 10903 -e disk0 file file="$img" >"$work/k.log" 2>&1 &
pids+=($!); wait_port 10903
bench_server nbdkit nbd://127.0.0.1:10903/disk0
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true

done

printf '\n%-10s %24s %28s %26s\n' server "4K randread QD32 IOPS" "same, 4 connections IOPS" "128K seq read QD8 MiB/s"
for s in nvstack qemu-nbd nbdkit; do
  printf '%-10s %24s %28s %26s\n' "$s" "$(med ${res[$s,rand]})" "$(med ${res[$s,rand4]})" "$(med ${res[$s,seq]})"
done
python3 - "$(med ${res[nvstack,rand]})" "$(med ${res[qemu-nbd,rand]})" "$(med ${res[nbdkit,rand]})" "$(med ${res[nvstack,seq]})" "$(med ${res[qemu-nbd,seq]})" \
  "$(med ${res[nvstack,rand4]})" "$(med ${res[qemu-nbd,rand4]})" "$(med ${res[nbdkit,rand4]})" <<'PY'
import sys
n, q, k, ns, qs, n4, q4, k4 = map(float, sys.argv[1:])
print(f"\nrandread, 1 connection:  nvstack/qemu-nbd = {n/q:.2f}x (target >= 2), nvstack/nbdkit = {n/k:.2f}x (target >= 1.5)")
print(f"randread, 4 connections: nvstack/qemu-nbd = {n4/q4:.2f}x (target >= 2), nvstack/nbdkit = {n4/k4:.2f}x (target >= 1.5)")
print(f"seq read: nvstack/qemu-nbd = {ns/qs:.2f}x (target >= 1)")
PY
