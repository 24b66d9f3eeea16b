#!/usr/bin/env bash
# Install the Debian packages listed in .ci/packages/*.txt, idempotently.
# As root: apt-get installs what is missing. Otherwise: print the exact command and fail.
# A package line may carry an apt version pin (qemu-utils=1:7.2*); lines in one file install in one apt call.
set -euo pipefail
cd "$(dirname "$0")/.."

missing_in() {
  local f=$1 pkg name
  while read -r pkg; do
    pkg=${pkg%%#*}; pkg=$(echo "$pkg" | xargs); [ -n "$pkg" ] || continue
    name=${pkg%%=*}
    local want=""
    [[ "$pkg" == *=* ]] && want=${pkg#*=}
    local have
    have=$(dpkg-query -W -f='${Status} ${Version}' "$name" 2>/dev/null || true)
    if [[ "$have" != "install ok installed"* ]]; then echo "$pkg"; continue; fi
    if [ -n "$want" ]; then
      local ver=${have#install ok installed }
      # shellcheck disable=SC2053
      [[ "$ver" == $want ]] || echo "$pkg"
    fi
  done < "$f"
}

updated=0
for f in .ci/packages/*.txt; do
  mapfile -t need < <(missing_in "$f")
  [ "${#need[@]}" -gt 0 ] || continue
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages from $f: ${need[*]}" >&2
    echo "run as root: apt-get update && apt-get install -y --allow-downgrades ${need[*]}" >&2
    exit 1
  fi
  if [ $updated -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    updated=1
  fi
  echo "installing from $f: ${need[*]}"
  # Whole file in one call: a file may pair packages whose versions must agree.
  # Read all lines of the file (not only the missing ones) so pinned companions stay together.
  mapfile -t all < <(sed -e 's/#.*//' -e '/^\s*$/d' "$f" | xargs -n1)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades "${all[@]}" >/dev/null
done
echo "system packages: ok"
