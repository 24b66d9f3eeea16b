#!/usr/bin/env bash
# The malloc (RAM) bdev on one core, QD32 random reads: 4 KiB (target >= 1.4 M IOPS) and 128 KiB.
#
# Printed: wall-clock IOPS, and IOPS per CPU second of the reactor thread (what the core would do if no other
# process shared it; equal to the wall-clock figure on a quiet machine).
#
# Env: SECONDS_PER_RUN (default 5), SIZE (malloc size, default 1G).
source "$(dirname "$0")/common.sh"
T="${SECONDS_PER_RUN:-5}"
SIZE="${SIZE:-1G}"
CORE="$(first_core)"
MASK="$(printf '0x%x' $((1 << CORE)))"
build
for bs in 4096 128K; do
    cmd=("$NVSTACK" perf --bdev "malloc:$SIZE" -q 32 -o "$bs" -w randread -m "$MASK" -t "$T" --no-progress --json)
    echo "+ ${cmd[*]}"
    "${cmd[@]}" 2>/dev/null | json_get '"-o %s: %.0f IOPS, %.1f MiB/s; reactor on CPU %.2f of %.2f s: %.0f IOPS per CPU second; latency p50 %.2f us, avg %.2f us, p99 %.2f us" % (
        d["run"]["io_size"], d["total"]["iops"], d["total"]["mib_s"], d["total"]["cpu_s"], d["total"]["runtime_s"],
        d["total"]["iops_per_cpu_s"], d["total"]["latency_us"]["p50"], d["total"]["latency_us"]["avg"],
        d["total"]["latency_us"]["p99"])'
done
echo "(target for 4 KiB: >= 1.4 M IOPS on a core of its own; load average now: $(cut -d' ' -f1 /proc/loadavg) on $(nproc) CPUs)"
