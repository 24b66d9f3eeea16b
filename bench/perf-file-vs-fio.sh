#!/usr/bin/env bash
# 4 KiB random reads at QD32 on a 1 GiB file in /dev/shm, one core: nvstack perf's file bdev (io_uring) against
# fio's io_uring engine on the same file, alternating A/B for ROUNDS rounds each, then the medians.
#
# Printed per round: wall-clock IOPS of each, and IOPS per CPU second (nvstack: the reactor thread's CPU time;
# fio: its usr+sys CPU share of the job), which is fairer when other processes share the machine.
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
nvc=()
fic=()
for r in $(seq 1 "$ROUNDS"); do
    read -r a ac < <("${nv_cmd[@]}" 2>/dev/null | json_get '"%f %f" % (d["total"]["iops"], d["total"]["iops_per_cpu_s"])')
    read -r b bc < <("${fio_cmd[@]}" 2>/dev/null | json_get \
        '"%f %f" % (d["jobs"][0]["read"]["iops"], d["jobs"][0]["read"]["iops"] * 100 / max(d["jobs"][0]["usr_cpu"] + d["jobs"][0]["sys_cpu"], 1e-9))')
    nv+=("$a")
    fi_+=("$b")
    nvc+=("$ac")
    fic+=("$bc")
    printf 'round %d: nvstack %10.0f IOPS (%10.0f per CPU s)   fio %10.0f IOPS (%10.0f per CPU s)\n' "$r" "$a" "$ac" "$b" "$bc"
done
ma="$(printf '%s\n' "${nv[@]}" | median)"
mb="$(printf '%s\n' "${fi_[@]}" | median)"
mac="$(printf '%s\n' "${nvc[@]}" | median)"
mbc="$(printf '%s\n' "${fic[@]}" | median)"
printf 'median:  nvstack %10.0f IOPS (%10.0f per CPU s)   fio %10.0f IOPS (%10.0f per CPU s)\n' "$ma" "$mac" "$mb" "$mbc"
python3 -c "print(f'ratio nvstack/fio: {$ma / $mb if $mb else 0:.2f} wall-clock, {$mac / $mbc if $mbc else 0:.2f} per CPU second')"
echo "(load average now: $(cut -d' ' -f1 /proc/loadavg) on $(nproc) CPUs)"
