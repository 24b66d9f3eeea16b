#!/usr/bin/env bash
# Every benchmark in bench/, one after another: the perf ones first, then any other bench/*.sh (common.sh is a
# library, not a benchmark). Each builds the release binary it needs first. Exit status 1 if any failed.
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)"
first=(perf-null-callgrind.sh perf-no-alloc.sh perf-malloc.sh perf-file-vs-fio.sh)
rest=()
for f in "$dir"/*.sh; do
    b="$(basename "$f")"
    case " ${first[*]} run-all.sh common.sh " in *" $b "*) continue ;; esac
    rest+=("$b")
done
status=0
for b in "${first[@]}" "${rest[@]}"; do
    echo "=== $b"
    bash "$dir/$b" || { echo "=== $b FAILED"; status=1; }
done
exit "$status"
