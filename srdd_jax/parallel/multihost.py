"""Several processes, one program: start-up, per-process batch slices, and who writes.

Every process runs the same code on its own devices. A global batch is never built on one host: each
process loads only the rows its devices hold (one or several spans, as the mesh lays them out), and
`jax.make_array_from_process_local_data` assembles the global array. Outputs (logs, metrics, images)
are written by process 0 only; checkpoints are written by all processes together (Orbax coordinates
them).
"""
from __future__ import annotations

import collections
import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from srdd_jax.config import ConfigError
from srdd_jax.parallel import pod

# Environment variables that request a multi-process start when the flags are not given (handy for
# launchers that can set the environment but not the command line).
ENV_COORDINATOR = 'SRDD_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'SRDD_NUM_PROCESSES'
ENV_PROCESS_ID = 'SRDD_PROCESS_ID'
ENV_HEARTBEAT = 'SRDD_HEARTBEAT_TIMEOUT_S'  # Seconds without a heartbeat before a task counts as dead.


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> bool:
  """Starts `jax.distributed` when several processes are asked for; returns whether it did.

  Explicit values (flags, else the SRDD_* environment variables) start a manual cluster, e.g. several
  processes on one machine; `auto` lets JAX detect the cluster (TPU pods, SLURM, Open MPI). With
  neither, a host of a multi-host TPU slice (`pod.detect`) starts as `auto` does, or refuses with a
  ConfigError naming the flags; anything else is a single process. Must run before any JAX computation.
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  manual = coordinator_address is not None or num_processes is not None or process_id is not None
  detected = None
  if not manual and not auto:
    detected = pod.detect()
    if detected is None:
      return False
    logging.info('%s: starting jax.distributed as --multihost would', detected)
  if manual:
    missing = [n for n, v in (('coordinator_address', coordinator_address), ('num_processes', num_processes),
                              ('process_id', process_id)) if v is None]
    if missing:
      raise ValueError(f'a multi-process start needs --coordinator_address, --num_processes and '
                       f'--process_id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); '
                       f'missing: {", ".join(missing)}')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} must be in 0..{num_processes - 1} (--num_processes='
                       f'{num_processes})')
  # CPU processes need a collectives backend to talk to each other; gloo ships with jaxlib. Harmless
  # on TPU and GPU, whose collectives do not use it.
  try:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  except (AttributeError, KeyError, ValueError):  # A JAX without the option has a working default.
    pass
  if manual:
    # A rehearsal oversubscribes its CPUs (32 processes on 2 cores): a process can go minutes without a
    # heartbeat while alive, and JAX's 100 s default then kills every task.
    patience = ({'heartbeat_timeout_seconds': int(os.environ[ENV_HEARTBEAT])} if os.environ.get(ENV_HEARTBEAT)
                else {})
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **patience)
  else:
    try:
      jax.distributed.initialize()
    except Exception as e:  # pylint: disable=broad-except
      if detected is None:
        raise
      reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise ConfigError(f'{detected}, but jax.distributed did not start by itself ({reason}); start every '
                        'host with --multihost, or give --coordinator_address, --num_processes and '
                        '--process_id') from None
  logging.info('process %d of %d, %d local / %d global devices', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def is_main_process() -> bool:
  return jax.process_index() == 0


def local_rows(sharding, global_batch: int) -> tuple[slice, ...]:
  """The rows of a batch-sharded (B, ...) array that this process's devices hold: sorted, disjoint spans.

  A mesh laid out by the chips' interconnect (JAX's device-mesh builder on a TPU pod) gives a host
  several spans (on v5p-64 with fsdp 8, row blocks 0, 1, 4 and 5), so the loader reads each span and
  `global_batch` places their concatenation, in this order, where the mesh wants it.
  """
  return rows_of(sharding, global_batch, sharding.addressable_devices)


def rows_of(sharding, global_batch: int, devices) -> tuple[slice, ...]:
  """The batch rows `devices` hold under `sharding`, as sorted, merged spans (see local_rows)."""
  index = sharding.devices_indices_map((global_batch,))
  spans = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
                  for s in (index[d] for d in devices)})
  merged: list[list[int]] = []
  for a, b in spans:
    if merged and a < merged[-1][1]:  # Equal spans (replicas) are one; anything else is no batch split.
      raise ValueError(f'devices of process {jax.process_index()} hold overlapping batch rows {spans}')
    if merged and a == merged[-1][1]:
      merged[-1][1] = b
    else:
      merged.append([a, b])
  return tuple(slice(a, b) for a, b in merged)


def global_batch(sharding, local: dict, global_size: int) -> dict:
  """Per-process numpy rows -> global jax.Arrays laid out by `sharding` (the leading axis is the batch)."""
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(sharding, v, (global_size,) + v.shape[1:])
  return out


def prefetch_to_devices(batches, place, size: int = 2):
  """Yields place(b) for each host batch b of `batches`, `size` batches ahead: the copies to the devices
  (asynchronous) of the next batches run while the devices compute the current step, as flax's
  prefetch_to_device does. size 0: placed when asked for."""
  queue = collections.deque()
  batches = iter(batches)
  while True:
    while len(queue) < max(size, 1):
      try:
        queue.append(place(next(batches)))
      except StopIteration:
        break
    if not queue:
      return
    yield queue.popleft()


def sync(name: str) -> None:
  """A barrier across processes (nothing with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def gather(x) -> np.ndarray:
  """A (possibly multi-process) global array -> the whole value as numpy on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
