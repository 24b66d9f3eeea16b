#!/usr/bin/env bash
# Cache hits on 2 reactors against 1, both measured at the same moment (issue 5), for machines with at least 3 free
# cores (5 with NVSTACK_B). Each round starts at once a 1-reactor `nvstack perf` on one core and a 2-reactor one on
# a pair of other cores (4 KiB random reads at QD32 per core over a fully cached malloc device) and divides the
# two. A shared machine's speed drifts by a third between runs seconds apart (the device machine: 1 reactor
# 1.35-3.15 M IOPS in one session); a ratio of runs taken one after the other carries that drift, a ratio of runs
# taken together does not. Places rotate every round (the pair's cross-core latency differs from pair to pair).
# The catch: the 1-reactor run shares the machine with the 2-reactor one (three busy cores: the last-level cache,
# memory, and on a VM perhaps host cores), and runs slower than alone, so this ratio can come out higher than one
# taken alone; read it beside bench/cache-scaling-cores.sh, not instead of it.
#   ROUNDS     rounds (default 8)
#   SECS       seconds per run (default 4)
#   NVSTACK_B  a second binary: its 2-reactor run goes at the same moment on a third place (an A/B of two builds)
#   SINGLES    cores for the 1-reactor run, taken in turn (default "0 15", or "0" with fewer than 16 cores)
#   PAIRS      core pairs for the 2-reactor runs, taken in turn (default "1,2 3,4 5,6")
source "$(dirname "$0")/common.sh"
build
ROUNDS="${ROUNDS:-8}"
SECS="${SECS:-4}"
SPEC="cache:malloc:64M,size=80M"
ncpu=$(nproc)
if [ "$ncpu" -lt 16 ]; then default_singles="0"; else default_singles="0 15"; fi
read -r -a singles <<<"${SINGLES:-$default_singles}"
read -r -a pairs <<<"${PAIRS:-1,2 3,4 5,6}"
want=3
[ -n "${NVSTACK_B:-}" ] && want=5
if [ "$ncpu" -lt "$want" ]; then
  echo "skipping: this machine has $ncpu cores and the runs need $want at once (on 2 cores: bench/cache-scaling.sh)" >&2
  exit 0
fi
mask() { python3 -c "print(hex(sum(1 << int(c) for c in '$1'.split(','))))"; }
run() { # BIN CORES -> IOPS
  "$1" perf --bdev "$SPEC" -q 32 -o 4096 -w randread -t "$SECS" -m "$(mask "$2")" --json 2>/dev/null | json_get 'd["total"]["iops"]'
}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "+ each round at once: $NVSTACK perf --bdev $SPEC -q 32 -o 4096 -w randread -t $SECS on 1 core and on 2 cores${NVSTACK_B:+; $NVSTACK_B on 2 more}" >&2
ra=(); rb=()
for r in $(seq 1 "$ROUNDS"); do
  one=${singles[$((r % ${#singles[@]}))]}
  pa=${pairs[$((r % ${#pairs[@]}))]}
  pb=${pairs[$(((r + 1) % ${#pairs[@]}))]}
  run "$NVSTACK" "$one" >"$TMP/one" &
  run "$NVSTACK" "$pa" >"$TMP/a" &
  [ -n "${NVSTACK_B:-}" ] && run "$NVSTACK_B" "$pb" >"$TMP/b" &
  wait
  o=$(cat "$TMP/one"); a=$(cat "$TMP/a")
  x=$(python3 -c "print(f'{$a/$o:.2f}')"); ra+=("$x")
  line="round $r: 1 reactor (core $one) $(python3 -c "print(f'{$o/1e6:.2f}')") M IOPS; 2 reactors (cores $pa) $(python3 -c "print(f'{$a/1e6:.2f}')") M IOPS, ${x}x"
  if [ -n "${NVSTACK_B:-}" ]; then
    b=$(cat "$TMP/b"); y=$(python3 -c "print(f'{$b/$o:.2f}')"); rb+=("$y")
    line="$line; B on 2 reactors (cores $pb) $(python3 -c "print(f'{$b/1e6:.2f}')") M IOPS, ${y}x"
  fi
  echo "$line"
done
echo "2 reactors against 1, median of $ROUNDS rounds: $(printf '%s\n' "${ra[@]}" | median)x${NVSTACK_B:+; B: $(printf '%s\n' "${rb[@]}" | median)x}"
