#!/usr/bin/env bash
# Cache-hit benchmark (issue 5): 4 KiB random-read hits at QD32 and 128 KiB hits at QD8 on one core, over a malloc
# backing device fully cached. Prints IOPS, GB/s and the cache counters.
#   CACHE_BENCH_SECS  seconds per figure (default 2)
#   CACHE_BENCH_MIB   device = cache size in MiB (default 64)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -q -p nvstack-cache --bench cache_hit 2>/dev/null | grep -v '^$'
