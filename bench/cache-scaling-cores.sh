#!/usr/bin/env bash
# Cache hits on 1, 2, 4, 8... reactors (issue 5), for machines with more than two cores: `nvstack perf` 4 KiB
# random reads at QD32 per core over a fully cached malloc device, the reactor counts in alternating order each
# round (forward, then backward), each round's figures divided by that round's 1-reactor figure; medians at the end.
#   REACTORS   reactor counts (default "1 2 4 8"; cores 0..n-1; counts beyond the machine's cores are skipped)
#   ROUNDS     rounds (default 4)
#   SECS       seconds per run (default 2)
source "$(dirname "$0")/common.sh"
build
REACTORS="${REACTORS:-1 2 4 8}"
ROUNDS="${ROUNDS:-4}"
SECS="${SECS:-2}"
SPEC="cache:malloc:64M,size=80M"
ncpu=$(nproc)
counts=()
for n in $REACTORS; do
  if [ "$n" -le "$ncpu" ]; then counts+=("$n"); else echo "skipping $n reactors: this machine has $ncpu cores" >&2; fi
done
mask() { python3 -c "print(hex((1 << $1) - 1))"; }
run() { show "$NVSTACK" perf --bdev "$SPEC" -q 32 -o 4096 -w randread -t "$SECS" -m "$(mask "$1")" --json 2>/dev/null | json_get 'd["total"]["iops"]'; }
declare -A ratios
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then order=("${counts[@]}"); else order=($(printf '%s\n' "${counts[@]}" | tac)); fi
  declare -A got=()
  for n in "${order[@]}"; do got[$n]=$(run "$n"); done
  line="round $r:"
  for n in "${counts[@]}"; do
    x=$(python3 -c "print(f'{${got[$n]}/${got[${counts[0]}]}:.2f}')")
    ratios[$n]="${ratios[$n]:-} $x"
    line="$line $n reactors $(python3 -c "print(f'{${got[$n]}/1e6:.2f}')") M IOPS (${x}x);"
  done
  echo "$line"
done
for n in "${counts[@]}"; do
  echo "$n reactors: median ratio to ${counts[0]} reactor(s) $(printf '%s\n' ${ratios[$n]} | median)x"
done
