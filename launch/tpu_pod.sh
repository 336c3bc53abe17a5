#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command on every host, JAX finds the others itself.
#
#   launch/tpu_pod.sh TPU_NAME ZONE WORKDIR CONFIG [MAIN_ARGS...]
#   launch/tpu_pod.sh my-v4-64 us-central2-b gs://bucket/ffhq_d16 configs/ffhq.py \
#       --config.data.path=/mnt/data/ffhq --config.tokenizer.checkpoint=/mnt/ckpt/vae_ch160v4096z32
#
# Assumes the repository is at ~/srdd_jax on every host with its .venv made by `make venv` (and JAX's
# TPU wheel: `.venv/bin/pip install 'jax[tpu]'`). WORKDIR must be shared by all hosts (a GCS bucket or
# a shared file system): Orbax writes checkpoints from every host, logs come from host 0.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE WORKDIR CONFIG [MAIN_ARGS...]" >&2
  exit 2
fi
tpu=$1; zone=$2; workdir=$3; config=$4; shift 4
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
  "cd ~/srdd_jax && .venv/bin/python -m srdd_jax.main --multihost --config=$config --workdir=$workdir --mode=train$extra"
