"""Backend-specific compiler options, and what a compiled program costs: FLOPs, memory, chip peaks."""
from __future__ import annotations

import functools
import time

import jax
import numpy as np


@functools.cache
def inference_compiler_options() -> dict | None:
  """Options for the sampler's programs, or None.

  On XLA:CPU the experimental YNN fusions take every scalar constant of an elementwise chain as a
  materialised full-size broadcast, and the scheduler computes those up front: the markov sampler of
  d16 at batch 32 then needs 4.7 GB instead of 1.9 GB, and it also runs ~20% slower. Turning the
  fusion off fixes both. Other backends get nothing; an XLA that no longer knows the option, neither.
  """
  if jax.default_backend() != 'cpu':
    return None
  opts = {'xla_cpu_experimental_ynn_fusion_type': ''}
  try:
    jax.jit(lambda x: x + 1, compiler_options=opts).lower(1.0).compile()
  except Exception:  # pylint: disable=broad-except
    return None
  return opts


def jit_inference(fn, **kwargs):
  """`jax.jit` with `inference_compiler_options()`."""
  opts = inference_compiler_options()
  return jax.jit(fn, compiler_options=opts, **kwargs) if opts else jax.jit(fn, **kwargs)


# Dense peak FLOP/s per chip (vendor datasheets, no sparsity) by a substring of `device_kind`, for MFU.
# bfloat16 peaks; float32 matmuls on these chips run through bf16 passes or TF32 at lower rates.
PEAK_FLOPS = (
    ('v6', 918e12), ('v5p', 459e12), ('v5 lite', 197e12), ('v5e', 197e12), ('v4', 275e12),
    ('h200', 989e12), ('h100', 989e12), ('a100', 312e12), ('l4', 121e12),
)

# HBM per chip in bytes, for "does it fit" checks of compiled programs.
HBM_BYTES = (
    ('v6', 32 << 30), ('v5p', 95 << 30), ('v5 lite', 16 << 30), ('v5lite', 16 << 30), ('v5e', 16 << 30),
    ('v4', 32 << 30), ('h200', 141 << 30), ('h100', 80 << 30), ('a100', 80 << 30),
)


def _lookup(table, device) -> float | None:
  """By a device's `device_kind`, or by a string (a kind, or a TPU topology name such as 'v5p')."""
  kind = (device if isinstance(device, str) else str(getattr(device, 'device_kind', ''))).lower()
  for key, value in table:
    if key in kind:
      return value
  return None


def nominal_peak_flops(device) -> float | None:
  """The datasheet dense bf16 peak of `device`'s chip, or None (CPUs, unknown chips)."""
  return _lookup(PEAK_FLOPS, device)


def hbm_bytes(device) -> int | None:
  return _lookup(HBM_BYTES, device)


@functools.cache
def measured_matmul_peak(dtype: str = 'float32', n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of an (n x n) @ (n x n) matmul on the default device: the best of `repeats` calls. Used
  where no datasheet peak is known (CPUs), so MFU is relative to what XLA's matmul reaches here."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


def compiled_stats(compiled) -> dict:
  """XLA's FLOPs, bytes accessed and memory analysis of a compiled program, per device; None where the
  backend gives none (XLA:GPU does not count custom calls such as cuDNN attention)."""
  out = {'xla_flops': None, 'xla_bytes_accessed': None, 'memory': None}
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # Older JAX: one dict per computation.
      cost = cost[0] if cost else None
    if cost:
      out['xla_flops'] = float(cost['flops']) if 'flops' in cost else None
      out['xla_bytes_accessed'] = float(cost['bytes accessed']) if 'bytes accessed' in cost else None
  except Exception as e:  # pylint: disable=broad-except
    out['cost_error'] = repr(e)
  try:
    m = compiled.memory_analysis()
    if m is not None:
      out['memory'] = {k: int(getattr(m, k)) for k in dir(m)
                       if k.endswith('_in_bytes') and isinstance(getattr(m, k), (int, np.integer))}
  except Exception as e:  # pylint: disable=broad-except
    out['memory_error'] = repr(e)
  return out


def needed_bytes(memory: dict | None) -> int | None:
  """Device bytes a program needs: arguments + outputs + temporaries - aliased (donated) bytes, or
  XLA's `peak_memory_in_bytes` where that is larger."""
  if not memory:
    return None
  total = (memory.get('argument_size_in_bytes', 0) + memory.get('output_size_in_bytes', 0) +
           memory.get('temp_size_in_bytes', 0) - memory.get('alias_size_in_bytes', 0))
  return max(total, memory.get('peak_memory_in_bytes', 0))
