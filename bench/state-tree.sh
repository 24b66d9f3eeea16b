#!/usr/bin/env bash
# State-tree benchmark (issue 5): set, find, clear and lock over 1 M ranges, against rangemap::RangeMap, and the
# per-core design against one shared tree behind a Mutex from 2 threads. Prints one line per figure.
#   STATE_TREE_RANGES  ranges in the tree (default 1048576)
#   STATE_TREE_OPS     operations per phase (default 200000)
# Figures depend on an idle machine: pass `taskset -c N` style pinning from outside if you need it.
set -euo pipefail
cd "$(dirname "$0")/.."
export STATE_TREE_RANGES="${STATE_TREE_RANGES:-1048576}"
export STATE_TREE_OPS="${STATE_TREE_OPS:-200000}"
cargo bench -q -p nvstack-cache --bench state_tree 2>/dev/null | grep -v '^$'
