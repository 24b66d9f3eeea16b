#!/usr/bin/env bash
# Instructions per I/O of `nvstack perf` on the null bdev (4 KiB randread, QD128, one core), measured with
# callgrind as the slope between two run lengths, so start-up and shutdown cancel out.
#
# Counted: instructions of ALL threads (callgrind's "Collected" total with --separate-threads=no): the reactor's
# hot loop plus the main thread (which sleeps) and the idle reactor before start / after the end (bounded by the
# reactor's idle back-off). Reference: SPDK bdevperf on a null bdev, 722 instructions/I/O. Goal: <= 361, aim 250.
#
# Env: N1, N2 (run lengths, default 200000 and 1000000).
source "$(dirname "$0")/common.sh"
N1="${N1:-200000}"
N2="${N2:-1000000}"
CORE="$(first_core)"
MASK="$(printf '0x%x' $((1 << CORE)))"
build
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

instr() {
    local n="$1"
    local cmd=(valgrind --tool=callgrind --callgrind-out-file="$tmp/callgrind.$n" "$NVSTACK" perf --bdev null:1G
        -q 128 -o 4096 -w randread -m "$MASK" --io-count "$n" -t 600 --no-progress --json)
    echo "+ ${cmd[*]}" >&2
    "${cmd[@]}" >"$tmp/out.$n" 2>"$tmp/log.$n" || { cat "$tmp/log.$n" >&2; exit 1; }
    local ios
    ios="$(json_get 'd["total"]["ios"]' <"$tmp/out.$n")"
    [ "$ios" = "$n" ] || { echo "expected $n I/Os, perf reports $ios" >&2; exit 1; }
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$tmp/log.$n"
}

i1="$(instr "$N1")"
i2="$(instr "$N2")"
per_io="$(python3 -c "print(f'{($i2 - $i1) / ($N2 - $N1):.1f}')")"
echo "callgrind total instructions: ${N1} I/Os: ${i1}; ${N2} I/Os: ${i2}"
echo "instructions per I/O (slope, all threads): ${per_io}   (SPDK bdevperf: 722; goal <= 361, aim 250)"
echo "top functions (self cost) of the ${N2}-I/O run:"
callgrind_annotate --inclusive=no "$tmp/callgrind.$N2" 2>/dev/null | sed -n '/file:function/,$p' | sed -n '3,14p' \
    | sed -E 's/ \[[^]]*\]$//' | cut -c1-160 || true
python3 -c "import sys; sys.exit(0 if $per_io <= 361 else 1)" || { echo "FAIL: above 361 instructions per I/O"; exit 1; }
