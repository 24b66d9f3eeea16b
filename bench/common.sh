# Shared helpers for the bench scripts (sourced, not run).
# Every script builds the release binary first and prints each command it runs before its figures.

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
# Figures come from the `perf` profile (release + thin LTO + one codegen unit; see Cargo.toml).
# NVSTACK_BIN names a binary built elsewhere (a machine without the toolchain); then nothing is built.
NVSTACK="${NVSTACK_BIN:-$TARGET_DIR/perf/nvstack}"

build() {
    if [ -n "${NVSTACK_BIN:-}" ]; then
        echo "+ using $NVSTACK_BIN (NVSTACK_BIN), not building" >&2
        return
    fi
    echo "+ cargo build --profile perf -p nvstack" >&2
    cargo build --profile perf -p nvstack >&2
}

# Print a command, then run it.
show() {
    echo "+ $*" >&2
    "$@"
}

# Median of the numbers on stdin (one per line).
median() {
    python3 -c 'import sys,statistics; v=[float(x) for x in sys.stdin.read().split()]; print(f"{statistics.median(v):.2f}")'
}

# A JSON field from stdin: json_get 'd["total"]["iops"]'
json_get() {
    python3 -c "import sys,json; d=json.load(sys.stdin); print($1)"
}

# The first core this process may run on (benchmarks pin to it).
first_core() {
    python3 -c 'import os; print(min(os.sched_getaffinity(0)))'
}
