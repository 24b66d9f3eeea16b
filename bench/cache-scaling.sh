#!/usr/bin/env bash
# Cache hits on 2 reactors against 1 (issue 5): `nvstack perf` 4 KiB random reads at QD32 per core over a fully
# cached malloc device. With one core the cache is the single-reactor engine; with two it is striped (1 MiB stripes,
# one shard per reactor; half of the pieces go to the other reactor through the rings). A/B alternating rounds;
# prints each round and the medians.
#   ROUNDS      alternating rounds (default 3)
#   SECS        seconds per run (default 4)
# On a 2-core machine the second reactor shares its core with the main thread's 10 ms watch loop.
source "$(dirname "$0")/common.sh"
build
ROUNDS="${ROUNDS:-3}"
SECS="${SECS:-4}"
SPEC="cache:malloc:64M,size=80M"
one=(); two=()
for r in $(seq 1 "$ROUNDS"); do
  for m in 0x1 0x3; do
    iops=$(show "$NVSTACK" perf --bdev "$SPEC" -q 32 -o 4096 -w randread -t "$SECS" -m "$m" --json 2>/dev/null | json_get 'd["total"]["iops"]')
    echo "round $r -m $m: $iops IOPS"
    if [ "$m" = 0x1 ]; then one+=("$iops"); else two+=("$iops"); fi
  done
done
m1=$(printf '%s\n' "${one[@]}" | median)
m2=$(printf '%s\n' "${two[@]}" | median)
echo "median: 1 reactor $m1 IOPS, 2 reactors $m2 IOPS, ratio $(python3 -c "print(f'{$m2/$m1:.2f}')")x"
