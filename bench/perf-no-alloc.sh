#!/usr/bin/env bash
# Steady state allocates nothing: valgrind memcheck's heap-allocation count of `nvstack perf` must not grow with the
# number of I/Os (malloc bdev, randrw with --verify: the busiest path). Also reports memcheck errors (must be 0).
#
# Env: N1, N2 (run lengths, default 20000 and 100000); SLACK (allocations the two runs may differ by, default 32:
# the progress/timing path differs by a few between runs).
source "$(dirname "$0")/common.sh"
N1="${N1:-20000}"
N2="${N2:-100000}"
SLACK="${SLACK:-32}"
CORE="$(first_core)"
MASK="$(printf '0x%x' $((1 << CORE)))"
build
allocs() {
    local cmd=(valgrind --tool=memcheck --error-exitcode=9 "$NVSTACK" perf --bdev malloc:64M -q 32 -o 4096 -w randrw
        --verify -m "$MASK" --io-count "$1" -t 600 --no-progress --json)
    echo "+ ${cmd[*]}" >&2
    local log
    log="$("${cmd[@]}" 2>&1 >/dev/null)" || { echo "$log" >&2; echo "FAIL: memcheck errors or perf failed" >&2; exit 1; }
    echo "$log" | sed -n 's/.*total heap usage: \([0-9,]*\) allocs.*/\1/p' | tr -d ,
}
a1="$(allocs "$N1")"
a2="$(allocs "$N2")"
echo "heap allocations: ${N1} I/Os: ${a1}; ${N2} I/Os: ${a2}; memcheck errors: 0"
[ $((a2 - a1)) -le "$SLACK" ] || { echo "FAIL: allocations grow with the I/O count"; exit 1; }
echo "PASS: the I/O path does not allocate"
