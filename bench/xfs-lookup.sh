#!/usr/bin/env bash
# XFS reverse-map lookup latency: a device offset (a poison event) -> its owners, on an image with > 100 k extents.
# Builds (or reuses) the cached image, runs the benchmark, prints the figures. Needs root (loop mount).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/make-xfs-images.sh --bench >/dev/null
cargo bench -p nvstack-rmap --bench xfs_lookup 2>&1 | grep -E '^(image|cold|warm|preload|metadata|example|PASS|FAIL)'
exit "${PIPESTATUS[0]}"
