#!/usr/bin/env bash
# The study's gpu preset (configs/ablation.py:gpu, issue 32) on a lent GPU machine that reaches no
# network: the packages its image lacks (ml-collections, clu) travel as wheels and Fashion-MNIST as
# Debian's IDX files, both in CARRY (default workdir/gpu_carry, 31 MB, ignored by git).
#
#   launch/gpu_study.sh --prepare               # here, once: wheels + IDX files into CARRY
#   launch/gpu_study.sh WORKDIR OUT [PRESET]    # there: runs (or resumes) the study in WORKDIR
#
# The study runs under `timeout` (STUDY_TIMEOUT seconds, default 540: a device command has 600) so that,
# finished or not, OUT receives what sizes the next run: study.json/md/png when it finished, every
# unit's result.json (each with its unit_seconds), the log, and the progress lines (training steps and
# image-passes done, their rates, the ETA). Exit status: the study's (124 when the time ran out).
# PYTHON (default python3) is the interpreter; PRESET defaults to gpu. GPU_STUDY_DRY_RUN=1 checks the
# arguments and the study's config (`--dry_run`) and downloads, copies and runs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=${CARRY:-workdir/gpu_carry}
PYTHON=${PYTHON:-python3}

DRY=${GPU_STUDY_DRY_RUN:-}

if [ "${1:-}" = "--prepare" ]; then
  if [ -n "$DRY" ]; then
    echo "would download the ml-collections and clu wheels into $CARRY/whl and copy the IDX files into $CARRY/fashion-mnist"
    exit 0
  fi
  set -e
  mkdir -p "$CARRY/whl" "$CARRY/fashion-mnist"
  # Pure-Python wheels: the GPU image's Python (3.12) takes them as they are.
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/whl" ml-collections clu
  src=${IDX_DIR:-/usr/share/datasets/fashion-mnist}
  for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
    [ -f "$src/$f" ] || { echo "error: $src/$f is missing (apt install dataset-fashion-mnist, or IDX_DIR=...)" >&2; exit 2; }
    cp "$src/$f" "$CARRY/fashion-mnist/"
  done
  du -sh "$CARRY"
  exit 0
fi

if [ $# -lt 2 ]; then
  echo "usage: launch/gpu_study.sh --prepare | WORKDIR OUT [PRESET]" >&2
  exit 2
fi
WORKDIR=$1 OUT=$2 PRESET=${3:-gpu}
STUDY=("$PYTHON" -m srdd_jax.main --config="configs/ablation.py:$PRESET" --config.data.idx_dir="$CARRY/fashion-mnist"
       --workdir="$WORKDIR" --mode=study)
if [ -n "$DRY" ]; then
  echo "${STUDY[*]}"
  exec "${STUDY[@]}" --dry_run
fi
for d in "$CARRY/fashion-mnist"; do
  [ -d "$d" ] || { echo "error: $d is missing: run launch/gpu_study.sh --prepare here and carry $CARRY" >&2; exit 2; }
done
mkdir -p "$OUT"
if ! "$PYTHON" -c 'import ml_collections, clu' 2>/dev/null; then
  ls "$CARRY"/whl/*.whl >/dev/null 2>&1 || { echo "error: ml_collections/clu missing and no wheels in $CARRY/whl" >&2; exit 2; }
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/srdd_site \
      "$CARRY"/whl/*.whl || exit 2
  export PYTHONPATH=/tmp/srdd_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
timeout --signal=TERM --kill-after=30 "${STUDY_TIMEOUT:-540}" "${STUDY[@]}" >"$OUT/study.log" 2>&1
rc=$?
cp "$WORKDIR"/study.json "$WORKDIR"/study.md "$WORKDIR"/study.png "$OUT"/ 2>/dev/null
# Every finished unit's result (small JSON), whatever the ending: the rates of a run cut short.
(cd "$WORKDIR" && find . -name result.json -not -path './jax_cache/*' | tar -czf "$OUT/units.tar.gz" -T -) 2>/dev/null
grep -E 'study: (training|[0-9]+ arms)|error:' "$OUT/study.log" | tail -n 40 >"$OUT/progress.txt"
tail -n 3 "$OUT/progress.txt"
echo "study exit status $rc (124: STUDY_TIMEOUT ran out; run again on the same machine to resume)"
exit $rc
