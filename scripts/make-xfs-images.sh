#!/usr/bin/env bash
# Build the XFS images that the reverse-map tests and benchmark read, cached under .cache/xfs-images/<script hash>/.
#
#   scripts/make-xfs-images.sh            # the oracle images (mixed-4k.img, mixed-1k.img); prints the directory
#   scripts/make-xfs-images.sh --bench    # also bench-100k.img (one file with more than 100 k extents)
#
# Images are made with `mkfs.xfs -m rmapbt=1,reflink=1` on sparse files, then filled through `mount -o loop`:
# fragmented files (interleaved appends with fsync), reflinked copies partly rewritten, directories of every size,
# xattrs (inline, leaf and remote), unwritten extents, long symlinks, and free space from deleted files.
# Needs root, a loop device, xfsprogs (mkfs.xfs, xfs_io, xfs_db) and attr (setfattr). Fails, naming what is missing.
# The last line of stdout is the image directory.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
script="$repo/scripts/make-xfs-images.sh"
want_bench=0
[ "${1:-}" = "--bench" ] && want_bench=1

missing=()
[ "$(id -u)" -eq 0 ] || missing+=("root (mount -o loop needs it: run as root)")
for tool in mkfs.xfs xfs_io xfs_db setfattr losetup mount umount flock sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool (install .ci/packages/xfs.txt: scripts/install-deps.sh)")
done
[ -e /dev/loop-control ] || missing+=("/dev/loop-control (no loop device support: modprobe loop)")
grep -qw xfs /proc/filesystems 2>/dev/null || modprobe xfs 2>/dev/null || true
grep -qw xfs /proc/filesystems 2>/dev/null || missing+=("the kernel's xfs filesystem (modprobe xfs)")
if [ "${#missing[@]}" -gt 0 ]; then
  echo "make-xfs-images: cannot build XFS test images; missing:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  exit 2
fi

hash=$(sha256sum "$script" | cut -c1-16)
base=${XFS_IMAGE_DIR:-$repo/.cache/xfs-images}
out="$base/$hash"
mkdir -p "$base"
exec 9>"$base/.lock"
flock 9

mnt=""
cleanup() {
  if [ -n "$mnt" ]; then
    mountpoint -q "$mnt" && umount "$mnt"
    rmdir "$mnt" 2>/dev/null || true
  fi
}
trap cleanup EXIT

mount_img() { # img
  mnt=$(mktemp -d /tmp/nvstack-xfs-mnt.XXXXXX)
  # allocsize=4k turns off speculative preallocation, so that interleaved appends really fragment.
  mount -o loop,allocsize=4k "$1" "$mnt"
}
umount_img() {
  umount "$mnt"
  rmdir "$mnt"
  mnt=""
}

# Interleaved appends with fsync across N files in one xfs_io process: every file ends up in many extents.
frag_files() { # dir nfiles rounds bs
  local dir=$1 n=$2 rounds=$3 bs=$4 i r
  mkdir -p "$dir"
  {
    for ((i = 1; i < n; i++)); do echo "open -f $dir/frag$i"; done
    for ((r = 0; r < rounds; r++)); do
      for ((i = 0; i < n; i++)); do
        echo "file $i"
        echo "pwrite -q -S $((r % 250 + 1)) $((r * bs)) $bs"
        echo "fsync"
      done
    done
  } | xfs_io -f "$dir/frag0" >/dev/null
}

fill() { # mountpoint blocksize
  local m=$1 bs=$2 i j
  # Fragmented files, large enough for their data forks to be btrees (bmbt blocks).
  # 1 KiB blocks: more rounds, so that the reverse-map btree of that AG grows to three levels.
  frag_files "$m/frag" 6 $((bs == 1024 ? 700 : 260)) "$bs"
  frag_files "$m/frag2" 3 90 $((bs * 3))
  # Directories: many small ones, one with thousands of entries (leaf and node directory blocks).
  for ((i = 0; i < 30; i++)); do
    mkdir -p "$m/tree/d$i"
    for ((j = 0; j < 20; j++)); do printf 'file %d %d\n' "$i" "$j" > "$m/tree/d$i/f$j"; done
  done
  mkdir -p "$m/big"
  (cd "$m/big" && for ((i = 0; i < 2500; i++)); do : > "entry-with-a-longish-name-$i"; done)
  # Xattrs: shortform (inline), leaf blocks (many attrs) and remote values (large).
  mkdir -p "$m/attrs"
  for ((i = 0; i < 12; i++)); do
    f="$m/attrs/a$i"
    echo "$i" > "$f"
    setfattr -n user.small -v "v$i" "$f"
    if ((i % 3 == 0)); then
      for ((j = 0; j < 60; j++)); do setfattr -n "user.k$j" -v "$(printf '%0200d' "$j")" "$f"; done
    fi
    if ((i % 4 == 1)); then
      setfattr -n user.remote -v "$(head -c 6000 /dev/zero | tr '\0' 'r')" "$f"
    fi
  done
  # Reflinked copies, then partial rewrites (CoW unshares part of each copy).
  mkdir -p "$m/ref"
  cp --reflink=always "$m/frag/frag0" "$m/ref/frag0.clone"
  cp --reflink=always "$m/frag/frag1" "$m/ref/frag1.clone"
  cp --reflink=always "$m/ref/frag1.clone" "$m/ref/frag1.clone2"
  xfs_io -f -c "pwrite -q -S 0x77 0 2m" -c fsync "$m/ref/solid" >/dev/null
  cp --reflink=always "$m/ref/solid" "$m/ref/solid.clone"
  xfs_io -c "pwrite -q -S 0x55 64k 64k" -c "pwrite -q -S 0x56 1m 8k" -c fsync "$m/ref/solid.clone" >/dev/null
  xfs_io -c "reflink $m/ref/solid 0 3m 256k" -c fsync "$m/ref/frag0.clone" >/dev/null
  # Unwritten extents: preallocate, then write the middle.
  xfs_io -f -c "falloc 0 1m" -c "pwrite -q 256k 64k" -c fsync "$m/unwritten" >/dev/null
  # Long symlinks (remote symlink blocks) and a few larger plain files.
  for ((i = 0; i < 5; i++)); do ln -s "$(printf 'target-%0900d' "$i")" "$m/link$i"; done
  for ((i = 0; i < 4; i++)); do xfs_io -f -c "pwrite -q 0 $((300 + i * 100))k" "$m/plain$i" >/dev/null; done
  # Free space: delete every other small file and one fragmented file.
  for ((i = 0; i < 30; i += 2)); do rm -f "$m/tree/d$i"/f1* ; done
  rm -f "$m/frag/frag5"
  sync
}

build_mixed() { # img blocksize agcount sectsize
  local img=$1 bs=$2 ag=$3 ss=$4
  truncate -s 320M "$img"
  mkfs.xfs -q -f -m rmapbt=1,reflink=1 -b size="$bs" -s size="$ss" -d agcount="$ag" "$img"
  mount_img "$img"
  fill "$mnt" "$bs"
  umount_img
}

build_bench() { # img
  local img=$1 nblk=210000 i
  truncate -s 1200M "$img"
  mkfs.xfs -q -f -m rmapbt=1,reflink=1 -b size=4096 -d agcount=4 "$img"
  mount_img "$img"
  # One preallocated file (unwritten extents: no data is written), then every other block punched out:
  # 105 000 single-block extents, each one reverse-map record.
  {
    echo "falloc 0 $((nblk * 4096))"
    for ((i = 1; i < nblk; i += 2)); do echo "fpunch $((i * 4096)) 4096"; done
  } | xfs_io -f "$mnt/holes" >/dev/null
  sync
  umount_img
}

mkdir -p "$out"
# Images of older versions of this script are stale: remove them.
find "$base" -mindepth 1 -maxdepth 1 -type d -regextype posix-extended -regex '.*/[0-9a-f]{16}' ! -name "$hash" \
  -exec rm -rf {} +
if [ ! -e "$out/mixed.done" ]; then
  echo "make-xfs-images: building oracle images in $out" >&2
  build_mixed "$out/mixed-4k.img.tmp" 4096 4 512
  mv "$out/mixed-4k.img.tmp" "$out/mixed-4k.img"
  build_mixed "$out/mixed-1k.img.tmp" 1024 3 512
  mv "$out/mixed-1k.img.tmp" "$out/mixed-1k.img"
  touch "$out/mixed.done"
fi
if [ "$want_bench" -eq 1 ] && [ ! -e "$out/bench.done" ]; then
  echo "make-xfs-images: building the 100 k extent benchmark image in $out" >&2
  build_bench "$out/bench-100k.img.tmp"
  mv "$out/bench-100k.img.tmp" "$out/bench-100k.img"
  touch "$out/bench.done"
fi
echo "$out"
