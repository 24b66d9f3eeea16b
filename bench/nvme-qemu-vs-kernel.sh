#!/usr/bin/env bash
# NVMe in a QEMU guest, same boot, same emulated controller: 4 KiB randread QD32 on one core through the kernel
# nvme driver (io_uring, O_DIRECT) and through nvstack's polled VFIO driver. Prints both IOPS and the ratio.
# Runs the harness scenario tests/scenarios/nvme-vfio-vs-kernel.toml (TCG guest: absolute numbers are emulation
# speed, only the ratio means anything).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "+ bash scripts/suites/qemu.sh --scenario nvme-vfio-vs-kernel --console" >&2
out=$(bash scripts/suites/qemu.sh --scenario nvme-vfio-vs-kernel --console 2>&1) || { echo "$out" | tail -60; exit 1; }
echo "$out" | grep -E "KERNEL_IOPS|VFIO_IOPS|IOPS_RATIO" | sed 's/^.*\(KERNEL_IOPS\|VFIO_IOPS\|IOPS_RATIO\)/\1/' | sort -u
