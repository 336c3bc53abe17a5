#!/usr/bin/env bash
# The pod dress rehearsal's record: srdd_jax.tools.rehearse_pod for v5p-32, -64, -128, -256 and two
# v5p-16 slices, one JSON each under OUT (default docs/pod); a record already there is not run again.
#
#   bash benchmarks/pod_rehearsal.sh [OUT] [WORKROOT]
set -uo pipefail
out=${1:-docs/pod}; root=${2:-/tmp/pod_rehearsal}
python=${PYTHON:-python3}
mkdir -p "$out"
run() {  # name topology slices mesh
  local f="$out/rehearsal_$1.json"
  [ -s "$f" ] && { echo "$f: recorded already"; return; }
  echo "$(date -u +%FT%TZ) $1: $2 x$3, mesh $4"
  rm -rf "$root/$1"
  JAX_PLATFORMS=cpu "$python" -m srdd_jax.tools.rehearse_pod --topology="$2" --slices="$3" --mesh="$4" \
    --workdir="$root/$1" --out="$f" > "$root/$1.log" 2>&1 || { echo "$1 failed: $root/$1.log"; return 1; }
  echo "$(date -u +%FT%TZ) $1: done"
}
status=0
run v5p-32 v5p:2x2x4 1 -1,-1,1 || status=1
run v5p-64_fsdp8 v5p:2x4x4 1 -1,8,1 || status=1
run v5p-64 v5p:2x4x4 1 -1,-1,1 || status=1
run 2xv5p-16 v5p:2x2x2 2 -1,-1,1 || status=1
run v5p-128 v5p:4x4x4 1 -1,-1,1 || status=1
run v5p-256 v5p:4x4x8 1 -1,-1,1 || status=1
exit $status
