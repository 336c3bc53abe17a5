"""Backend-specific compiler options, what a compiled program costs (FLOPs, memory, chip peaks), and
programs compiled ahead of time for a TPU topology on any host (no TPU attached; libtpu installed)."""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax.config import ConfigError
from srdd_jax.parallel import mesh as pm


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


def hbm_bytes(device, device_kind: str = '') -> int | None:
  """HBM per chip by a device, a device kind or a TPU topology's name ('v5p:4x4x4'); failing that, by
  `device_kind`."""
  name = device.split(':')[0] if isinstance(device, str) else device
  return _lookup(HBM_BYTES, name) or (_lookup(HBM_BYTES, device_kind) if device_kind else None)


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


# --- ahead of time: programs compiled for a TPU topology on any host -----------------------------------

topology_devices = pm.topology_devices  # Its home is mesh.py (the rehearsal builds meshes from it).

FIT_FRACTION = 0.8  # Headroom for the runtime, fragmentation and what XLA's analysis leaves out.


def rules_for(name: str):
  """'fsdp': the project's rules (parameters and moments split over fsdp, batch over data x fsdp);
  'replicated': every parameter on every chip (plain data parallelism)."""
  if name == 'fsdp':
    return pm.DEFAULT_RULES
  if name == 'replicated':
    return tuple((axis, ('data', 'fsdp') if axis == 'batch' else None) for axis, _ in pm.DEFAULT_RULES)
  raise ValueError(f'--rules {name!r}: must be fsdp or replicated')


def abstract(tree, shardings):
  """Shape-only stand-ins (ShapeDtypeStruct) of `tree`'s arrays, placed with `shardings`."""
  return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                tree, shardings)


def jit_train_step(trainer):
  """A trainer's step (its `step_fn()`: (state, tokenizer params, batch) -> (state, metrics)) jitted with
  the state's shardings, the tokenizer replicated, the batch split over the batch axes and the state
  donated. `trainer`: srdd_jax.train.step.Trainer (its abstract_state, step_fn, batch_sharding, mesh)."""
  _, shardings = trainer.abstract_state()
  rep = pm.replicated(trainer.mesh)
  return jax.jit(trainer.step_fn(), in_shardings=(shardings, rep, trainer.batch_sharding),
                 out_shardings=(shardings, rep), donate_argnums=0)


def aot_train_step(trainer, tokenizer_params, batch: int):
  """(compiled, seconds): the trainer's real train step compiled from abstract state, the abstract
  tokenizer params (replicated) and a batch of `batch` token ids, for the devices of its mesh (a TPU
  topology's, say); nothing is allocated."""
  mesh = trainer.mesh
  if batch % pm.data_parallel_size(mesh):
    raise ValueError(f'--batch {batch}: must be divisible by the {pm.data_parallel_size(mesh)} chips of '
                     f'the data x fsdp axes of mesh {dict(mesh.shape)}')
  state, shardings = trainer.abstract_state()
  rep = pm.replicated(mesh)
  seq_len = trainer.var_config.seq_len
  args = (abstract(state, shardings),
          abstract(tokenizer_params, jax.tree_util.tree_map(lambda _: rep, tokenizer_params)),
          {'labels': jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=trainer.batch_sharding),
           'ids': jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=trainer.batch_sharding)})
  t = time.perf_counter()
  compiled = jit_train_step(trainer).lower(*args).compile()
  return compiled, time.perf_counter() - t


def aot_record(compiled, compile_s: float, topology: str, devices, mesh) -> dict:
  """What a program compiled ahead of time costs per chip (XLA's memory and cost analyses of the
  partitioned program) and whether it fits in FIT_FRACTION of the chip's HBM."""
  stats = compiled_stats(compiled)
  per_chip = needed_bytes(stats['memory'])
  hbm = hbm_bytes(topology, devices[0].device_kind)
  rec = {'topology': topology, 'chips': len(devices), 'device_kind': devices[0].device_kind,
         'mesh': dict(mesh.shape), 'per_chip_bytes': per_chip, 'memory': stats['memory'],
         'generated_code_bytes': (stats['memory'] or {}).get('generated_code_size_in_bytes'),
         'xla_flops': stats['xla_flops'], 'xla_bytes_accessed': stats['xla_bytes_accessed'],
         'hbm_bytes': hbm, 'fit_fraction': FIT_FRACTION,
         'fits': None if hbm is None or per_chip is None else per_chip <= FIT_FRACTION * hbm,
         'compile_s': compile_s, 'memory_bytes': per_chip,
         'note': 'memory and cost are XLA\'s analyses of the partitioned program: per chip'}
  for k in ('cost_error', 'memory_error'):
    if k in stats:
      rec[k] = stats[k]
  return rec
