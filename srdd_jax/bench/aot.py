"""Ahead of time, for a TPU topology (`--aot TOPOLOGY`): no TPU is needed. `jax.experimental.topologies`
describes the chips of, say, `v5p:2x2x2` (libtpu must be installed: `pip install -e '.[tpu]'`), the mesh
is built on those devices, and the real train step and the tokens program are compiled for them from
abstract shapes with shardings. Reported per chip: XLA's memory analysis (arguments, outputs,
temporaries, aliased, generated code), its FLOP and bytes-accessed counts, and whether the program fits
in 80% of the chip's HBM (`HBM_BYTES`).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from srdd_jax.bench.base import (DECODE_PRECISION, SAMPLER, error_info, gb, log, model_fields,
                                 tokenizer_config, train_flops)
from srdd_jax.diffusion.sampler import Sampler, batch_rng
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import compile as pc
# hbm_bytes is imported for this module's API too (tests read aot.hbm_bytes).
from srdd_jax.parallel.compile import (FIT_FRACTION, abstract, aot_record, aot_train_step, hbm_bytes,
                                       rules_for, topology_devices)
from srdd_jax.tokenizer.api import Tokenizer, unbox
from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.train.optimizer import OptimConfig
from srdd_jax.train.step import Trainer
from srdd_jax.transformer.config import VARConfig

# Chip HBM in bytes, by the topology's prefix (Google Cloud's published capacities).
HBM_BYTES = dict(pc.HBM_BYTES)  # By a substring of the chip's name.
AOT_FIELDS = ('mode', 'kind', 'depth', 'width', 'batch', 'dtype', 'topology', 'chips', 'mesh', 'rules',
              'per_chip_bytes', 'memory', 'xla_flops', 'xla_bytes_accessed', 'hbm_bytes', 'fits',
              'compile_s')


def _aot_record(kind, c, batch, topology, devices, mesh, rules_name, compiled, compile_s) -> dict:
  rec = {**model_fields(c, batch), 'kind': kind, 'rules': rules_name,
         **aot_record(compiled, compile_s, topology, devices, mesh)}
  if kind == 'aot_train':
    rec['analytic_flops_per_chip'] = train_flops(c, batch)['train_per_step'] / len(devices)
  return rec


def aot_train(c: VARConfig, vae_c: VQVAEConfig, topology: str, devices, mesh, rules_name: str,
              batch: int) -> dict:
  """The real train step, compiled for the topology from abstract state, tokenizer and batch."""
  trainer = Trainer(c, vae_c, OptimConfig(peak_lr=1e-4, total_steps=1000), mesh, rules=rules_for(rules_name))
  compiled, compile_s = aot_train_step(trainer, unbox(Tokenizer(vae_c).abstract_params()), batch)
  return _aot_record('aot_train', c, batch, topology, devices, mesh, rules_name, compiled, compile_s)


def aot_sample(c: VARConfig, vae_c: VQVAEConfig, topology: str, devices, mesh, rules_name: str,
               batch: int) -> dict:
  """The sampler's tokens program (cfg 1.5, top-k 900, top-p 0.96) compiled for the topology."""
  if batch % pm.data_parallel_size(mesh):
    raise ValueError(f'--sample_batch {batch}: must be divisible by the {pm.data_parallel_size(mesh)} '
                     f'chips of the data x fsdp axes of mesh {dict(mesh.shape)}')
  trainer = Trainer(c, vae_c, OptimConfig(peak_lr=1e-4, total_steps=1000), mesh, rules=rules_for(rules_name))
  state, shardings = trainer.abstract_state()
  rep = pm.replicated(mesh)
  vae = unbox(Tokenizer(vae_c).abstract_params())
  sampler = Sampler(c, vae_c, SAMPLER, mesh=mesh, decode_precision=DECODE_PRECISION)
  args = (abstract(state.params, shardings.params),
          abstract(vae, jax.tree_util.tree_map(lambda _: rep, vae)),
          jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=trainer.batch_sharding),
          jax.ShapeDtypeStruct(batch_rng(0, 0).shape, batch_rng(0, 0).dtype, sharding=rep))
  t = time.perf_counter()
  # Plain jit: jit_inference's options are XLA:CPU's, and this host's backend is the CPU.
  compiled = jax.jit(sampler.tokens).lower(*args).compile()
  return _aot_record('aot_sample', c, batch, topology, devices, mesh, rules_name, compiled,
                     time.perf_counter() - t)


def run_aot(topology: str, base: VARConfig, masks, batch: int, sample_batch: int, mesh_shape,
            rules_name: str, kinds=('train', 'sample'), tokenizer_ch: int = 160, on_record=None) -> list[dict]:
  devices = topology_devices(topology)
  try:
    mesh = pm.make_mesh(mesh_shape, devices)
  except ValueError as e:
    raise ValueError(f'--mesh {",".join(map(str, mesh_shape))}: {e}') from e
  rules_for(rules_name)  # An unknown name fails before any compile.
  records = []
  for mask in masks:
    c = dataclasses.replace(base, mask=mask)
    vae_c = tokenizer_config(c, tokenizer_ch)
    for kind in kinds:
      log(f'aot {kind} {mask} {topology} ({len(devices)} chips, mesh {dict(mesh.shape)}, rules '
          f'{rules_name}), depth {c.depth}, batch {batch if kind == "train" else sample_batch}')
      try:
        if kind == 'train':
          rec = aot_train(c, vae_c, topology, devices, mesh, rules_name, batch)
        else:
          rec = aot_sample(c, vae_c, topology, devices, mesh, rules_name, sample_batch)
        log(f'  compiled in {rec["compile_s"]:.1f}s: {gb(rec["per_chip_bytes"])} GiB per chip of '
            f'{gb(rec["hbm_bytes"])} (fits in {FIT_FRACTION:.0%}: {rec["fits"]}), '
            f'{(rec["xla_flops"] or 0) / 1e12:.3f} TFLOP per chip')
      except Exception as e:  # pylint: disable=broad-except
        rec = {**model_fields(c, batch if kind == 'train' else sample_batch), 'kind': f'aot_{kind}',
               'topology': topology, 'chips': len(devices), **error_info(e)}
        log(f'  failed: {rec["error"].splitlines()[0][:300]}')
      records.append(rec)
      if on_record is not None:
        on_record(rec)
  return records
