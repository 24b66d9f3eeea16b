#!/usr/bin/env bash
# Run every test nvstack has: install what is missing, build, unit/property/contract tests, then the system
# suites (QEMU emulation and real clients). Fails loudly; never passes without having run.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { echo; echo "=== $* ($(( $(date +%s) - start )) s)"; }

step "system packages"
scripts/install-deps.sh

step "build (release)"
cargo build --workspace --release --all-targets

step "lints"
cargo clippy --workspace --all-targets --release -- -D warnings

step "unit, property and contract tests"
cargo test --workspace --release

for suite in scripts/suites/*.sh; do
  [ -e "$suite" ] || continue
  step "suite $(basename "$suite" .sh)"
  bash "$suite"
done

step "all tests passed in $(( $(date +%s) - start )) s"
