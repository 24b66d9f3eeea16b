#!/usr/bin/env bash
# 4 KiB random reads at QD32 on a 1 GiB file in /dev/shm, one core: nvstack perf's file bdev (io_uring) against
# fio's io_uring engine on the same file, alternating A/B for ROUNDS rounds each, then the medians.
#
# Env: ROUNDS (default 3), SECONDS_PER_RUN (default 5), FILE (default /dev/shm/nvstack-bench.img).
source "$(dirname "$0")/common.sh"
ROUNDS="${ROUNDS:-3}"
T="${SECONDS_PER_RUN:-5}"
FILE="${FILE:-/dev/shm/nvstack-bench.img}"
CORE="$(first_core)"
MASK="$(printf '0x%x' $((1 << CORE)))"
command -v fio >/dev/null || { echo "fio is not installed (see .ci/packages)" >&2; exit 1; }
build
created=0
if [ ! -f "$FILE" ] || [ "$(stat -c %s "$FILE")" != $((1 << 30)) ]; then
    # Real pages, not a sparse file: reads must hit memory, not tmpfs holes.
    show dd if=/dev/urandom of="$FILE" bs=1M count=1024 status=none
    created=1
fi
cleanup() { [ "$created" = 1 ] && rm -f "$FILE"; true; }
trap cleanup EXIT

nv_cmd=("$NVSTACK" perf --bdev "file:$FILE" -q 32 -o 4096 -w randread -m "$MASK" -t "$T" --no-progress --json)
fio_cmd=(fio --name=randread --filename="$FILE" --ioengine=io_uring --iodepth=32 --direct=0 --rw=randread --bs=4k
    --size=1G --time_based --runtime="$T" --cpus_allowed="$CORE" --output-format=json)
echo "A: ${nv_cmd[*]}"
echo "B: ${fio_cmd[*]}"
nv=()
fi_=()
for r in $(seq 1 "$ROUNDS"); do
    a="$("${nv_cmd[@]}" 2>/dev/null | json_get 'd["total"]["iops"]')"
    b="$("${fio_cmd[@]}" 2>/dev/null | json_get 'd["jobs"][0]["read"]["iops"]')"
    nv+=("$a")
    fi_+=("$b")
    printf 'round %d: nvstack %12.0f IOPS   fio %12.0f IOPS\n' "$r" "$a" "$b"
done
ma="$(printf '%s\n' "${nv[@]}" | median)"
mb="$(printf '%s\n' "${fi_[@]}" | median)"
printf 'median:  nvstack %12.0f IOPS   fio %12.0f IOPS   ratio nvstack/fio %.2f\n' "$ma" "$mb" \
    "$(python3 -c "print($ma / $mb if $mb else 0)")"
