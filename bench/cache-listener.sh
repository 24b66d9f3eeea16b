#!/usr/bin/env bash
# Issue 6: the cache-hit benchmark with and without the poison listener running (alternating rounds, medians).
#   ROUNDS (default 4), SECS per run (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
echo "+ cargo bench -p nvstack-rmap --bench cache_with_listener" >&2
cargo bench -q -p nvstack-rmap --bench cache_with_listener 2>/dev/null | grep -v '^$'
