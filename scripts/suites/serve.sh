#!/usr/bin/env bash
# System suite for `nvstack serve`: the appliance as a user starts it, with no configuration, from a fresh
# directory; real clients; a clean stop. (The detailed client tests are cargo integration tests:
# apps/tests/serve_clients.rs, serve_protocol.rs, serve_rpc.rs, serve_crash.rs, run by `cargo test`.)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
bin=${NVSTACK_BIN:-$root/target/release/nvstack}
[ -x "$bin" ] || cargo build --release -p nvstack
for t in nbdinfo nbdcopy qemu-io; do
  command -v "$t" >/dev/null || { echo "serve suite: $t missing (scripts/install-deps.sh installs it)" >&2; exit 1; }
done
work=$(mktemp -d /tmp/nvstack-serve-suite.XXXXXX)
pid=
cleanup() { [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
cd "$work"
port=$(( 20000 + RANDOM % 20000 ))
"$bin" serve --port "$port" >serve.out 2>serve.err &
pid=$!
for _ in $(seq 1 300); do grep -q "nvstack serve: ready" serve.out 2>/dev/null && break; sleep 0.1; done
grep -q "nvstack serve: ready" serve.out || { echo "serve suite: not ready"; cat serve.err; exit 1; }
grep -q "nbdinfo nbd://127.0.0.1:$port/disk0" serve.out || { echo "serve suite: banner lacks the connect line"; cat serve.out; exit 1; }
[ -S nvstack-data/nvstack.sock ] && [ -S nvstack-data/nbd.sock ] && [ -f nvstack-data/disk0.img ]
size=$(nbdinfo --size "nbd://127.0.0.1:$port/disk0")
[ "$size" = 1073741824 ] || { echo "serve suite: default volume is $size bytes, want 1 GiB"; exit 1; }
qemu-io -f raw -c "write -P 0x42 0 4M" -c flush "nbd://127.0.0.1:$port/disk0" >/dev/null
qemu-io -f raw -r -c "read -P 0x42 0 4M" "nbd+unix:///disk0?socket=$work/nvstack-data/nbd.sock" >read.out
grep "read 4194304/4194304" read.out >/dev/null
head -c 16M /dev/urandom >in.img
nbdcopy --connections=4 in.img "nbd://127.0.0.1:$port/disk0"
"$bin" rpc -s nvstack-data/nvstack.sock bdev_get_iostat >iostat.json
grep '"bytes_written"' iostat.json >/dev/null
"$bin" rpc -s nvstack-data/nvstack.sock save_config >saved.json
kill -TERM "$pid"
status=0; wait "$pid" || status=$?
pid=
[ "$status" = 0 ] || { echo "serve suite: SIGTERM exit status $status"; cat serve.err; exit 1; }
# Data written before the stop is in the file after it.
cmp -n $((16 << 20)) in.img nvstack-data/disk0.img
# Restart from the saved config: the same volume comes back.
"$bin" serve --port "$port" -c saved.json >serve2.out 2>serve2.err &
pid=$!
for _ in $(seq 1 300); do grep -q "nvstack serve: ready" serve2.out 2>/dev/null && break; sleep 0.1; done
nbdcopy "nbd://127.0.0.1:$port/disk0" out.img
cmp -n $((16 << 20)) in.img out.img
kill -INT "$pid"; wait "$pid"; pid=
echo "serve suite: 1 passed, 0 failed"
