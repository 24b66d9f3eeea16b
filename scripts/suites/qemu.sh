#!/usr/bin/env bash
# QEMU emulation suite: boots a fresh TCG guest per scenario (emulated NVMe controllers, NVDIMMs, intel-iommu)
# and runs tests/scenarios/*.toml. See tests/README.md. Arguments go to nvstack-qemu (e.g. --scenario devdax).
# Fails (never passes) when it cannot run: missing packages are installed as root, or named otherwise.
set -euo pipefail
cd "$(dirname "$0")/../.."

missing=()
for tool in qemu-system-x86_64 busybox ndctl daxctl nvme lspci mkfs.xfs cpio kmod depmod dpkg apt-get objcopy; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || [ -x "/sbin/$tool" ] || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "qemu suite: missing ${missing[*]}; installing .ci/packages/*.txt"
  scripts/install-deps.sh   # as root installs; otherwise prints the apt-get command and fails
fi

cargo build --release -p nvstack -p nvstack-tests --bins
target=${CARGO_TARGET_DIR:-target}
# Every scenario has its own deadline; this bounds the whole suite should the runner itself hang.
# QEMU children die with the runner (PR_SET_PDEATHSIG).
exec timeout --kill-after=15 1500 "$target/release/nvstack-qemu" "$@"
