#!/usr/bin/env bash
# N processes of one job on this machine, D forced CPU devices each: multi-host training on a laptop.
#
#   launch/local.sh N D LOGDIR -- --config=configs/smoke.py --workdir=DIR --mode=train
#
# Every process runs `python -m srdd_jax.main` with the arguments after `--`; process i logs to
# LOGDIR/process_i.log. The exit status is the first non-zero status of any process.
set -uo pipefail
if [ $# -lt 4 ] || [ "$4" != "--" ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS LOGDIR -- MAIN_ARGS..." >&2
  exit 2
fi
n=$1; d=$2; logdir=$3; shift 4
python=${PYTHON:-python3}
port=${SRDD_PORT:-$($python -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
mkdir -p "$logdir"
pids=()
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$d" JAX_PLATFORMS=cpu \
  SRDD_COORDINATOR_ADDRESS="localhost:$port" SRDD_NUM_PROCESSES=$n SRDD_PROCESS_ID=$i \
    "$python" -m srdd_jax.main "$@" >"$logdir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; rc=$?
  if [ $rc -ne 0 ]; then
    echo "process $i exited with $rc; see $logdir/process_$i.log" >&2
    [ $status -eq 0 ] && status=$rc
  fi
done
exit $status
