#!/usr/bin/env bash
# Instructions per 4 KiB I/O of the reactor thread against the simulated NVMe controller: submit + completion,
# nvme driver and nvme bdev (blockdev/benches/nvme_sim_io.rs: 4 KiB random reads, QD32, one channel).
#
# Counted: the reactor (main) thread only: callgrind --separate-threads=yes writes one profile per thread; the
# simulator thread (the "device") is thread 2 and is not counted. The figure is the slope between two run lengths,
# so set-up (arena, bring-up, identify, queue creation) cancels out. Empty polls (the reactor waiting for the
# simulator, which valgrind runs one thread at a time) are counted too and are printed.
#
# Must: <= 300 instructions per I/O. Aim: 150.
# Env: N1, N2 (run lengths, default 20000 and 100000), QD (default 32).
source "$(dirname "$0")/common.sh"
N1="${N1:-20000}"
N2="${N2:-100000}"
QD="${QD:-32}"
echo "+ cargo bench -p nvstack-blockdev --bench nvme_sim_io --no-run" >&2
BIN="$(cargo bench -p nvstack-blockdev --bench nvme_sim_io --no-run 2>&1 | tee /dev/stderr \
    | sed -n 's/.*Executable .*(\(.*nvme_sim_io-[0-9a-f]*\)).*/\1/p' | tail -1)"
[ -x "$BIN" ] || { echo "bench binary not found" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

instr() {
    local n="$1"
    local cmd=(valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$tmp/cg.$n" "$BIN" "$n" "$QD")
    echo "+ ${cmd[*]}" >&2
    "${cmd[@]}" >"$tmp/out.$n" 2>"$tmp/log.$n" || { cat "$tmp/log.$n" >&2; exit 1; }
    echo "  $(cat "$tmp/out.$n")" >&2
    # Thread 1 is the reactor (main) thread.
    sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$tmp/cg.$n-01"
}

i1="$(instr "$N1")"
i2="$(instr "$N2")"
per_io="$(python3 -c "print(f'{($i2 - $i1) / ($N2 - $N1):.1f}')")"
echo "reactor thread instructions: ${N1} I/Os: ${i1}; ${N2} I/Os: ${i2}"
echo "instructions per 4 KiB I/O (slope, reactor thread, submit + completion, driver + bdev): ${per_io}   (must <= 300, aim 150)"
echo "top functions (self cost, reactor thread) of the ${N2}-I/O run:"
callgrind_annotate --inclusive=no "$tmp/cg.$N2-01" 2>/dev/null | sed -n '/file:function/,$p' | sed -n '3,14p' \
    | sed -E 's/ \[[^]]*\]$//' | cut -c1-160 || true
python3 -c "import sys; sys.exit(0 if $per_io <= 300 else 1)" || { echo "FAIL: above 300 instructions per I/O"; exit 1; }
