"""Sampling from a config: the SamplerConfig of config.sampler, the Sampler of the configured
checkpoints, and `generate` (batches with distinct seeds, split over the mesh, gathered)."""
from __future__ import annotations

import math

import time

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from srdd_jax.config import ConfigError, floats, ints
from srdd_jax.convert.loading import load_models
from srdd_jax.data.images import to_uint8
from srdd_jax.diffusion.filtering import PROTOCOL_OF_MASK, PROTOCOLS, SamplerConfig
from srdd_jax.diffusion.sampler import Sampler, batch_rng
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import multihost
from srdd_jax.parallel.compile import jit_inference
from srdd_jax.tokenizer.vqvae import PRECISIONS


def protocol_values(c, mask: str) -> dict:
  """The guidance and masked-resampling values of config.sampler `c` for a model with `mask`: those the
  config sets, the rest from its protocol ('auto': VAR's for the causal mask, SRDD's for markov)."""
  name = c.get('protocol', 'auto')
  if name == 'auto':
    if mask not in PROTOCOL_OF_MASK:
      raise ConfigError(f'config.sampler.protocol=auto needs the model mask (markov or causal), got {mask!r}')
    name = PROTOCOL_OF_MASK[mask]
  if name not in PROTOCOLS:
    raise ConfigError(f'config.sampler.protocol={name!r}: use auto, {", ".join(sorted(PROTOCOLS))}')
  p = PROTOCOLS[name]
  # -1 is the one "unset" value (the protocol's); another negative is a typo, not a request for the default.
  for key in ('cfg', 'mr_threshold', 'mr_iterations'):
    if float(c[key]) < 0 and float(c[key]) != -1:
      raise ConfigError(f'config.sampler.{key}={c[key]!r}: -1 leaves it to the protocol; other values must be '
                        '>= 0')
  unset = {'cfg': float(c.cfg) == -1, 'cfg_schedule': c.cfg_schedule == '',
           'mr_threshold': float(c.mr_threshold) == -1, 'mr_iterations': int(c.mr_iterations) == -1}
  out = {k: (p[k] if unset[k] else c[k]) for k in unset}
  out['protocol'] = name
  return out


def sampler_config(c, mask: str) -> SamplerConfig:
  """config.sampler as a SamplerConfig for a model with `mask`; errors name the key."""
  v = protocol_values(c, mask)
  sched = v['cfg_schedule']
  if isinstance(sched, str) and sched not in ('linear', 'constant'):
    sched = floats(sched, 'config.sampler.cfg_schedule')
    if not all(math.isfinite(t) for t in sched):
      raise ConfigError(f'config.sampler.cfg_schedule={v["cfg_schedule"]!r}: every value must be finite')
  mr_scales = ints(c.mr_scales, 'config.sampler.mr_scales')
  if any(x not in (0, 1) for x in mr_scales):
    raise ConfigError(f'config.sampler.mr_scales={c.mr_scales!r}: one 0 (off) or 1 (on) per scale, or \'\' for '
                      'every scale')
  try:
    return SamplerConfig(cfg=float(v['cfg']), cfg_schedule=sched, temperature=float(c.temperature),
                         top_k=int(c.top_k), top_p=float(c.top_p), min_p=float(c.min_p),
                         greedy=bool(c.greedy),
                         mr_threshold=float(v['mr_threshold']), mr_iterations=int(v['mr_iterations']),
                         mr_mode=str(c.mr_mode),
                         mr_scales=tuple(bool(x) for x in mr_scales) or None)
  except ValueError as e:
    raise ConfigError(f'config.sampler: {e}') from e


def decode_precision(c) -> str | None:
  """config.sampler.decode_precision checked: the matmul precision of the sampler's image decoder
  ('' = the tokenizer's own, config.tokenizer.precision)."""
  value = str(c.get('decode_precision', ''))
  if value and value not in PRECISIONS:
    raise ConfigError(f'config.sampler.decode_precision={value!r}: must be one of {sorted(PRECISIONS)}, or \'\' '
                      'for config.tokenizer.precision')
  return value or None


def sampler_config_for(c, var_config) -> SamplerConfig:
  """sampler_config for the model of `var_config`, with what can only be checked once the model is known:
  one config.sampler.mr_scales entry per scale of its patch_nums."""
  decode_precision(c)
  sc = sampler_config(c, var_config.mask)
  n = len(var_config.patch_nums)
  if sc.mr_scales is not None and len(sc.mr_scales) != n:
    raise ConfigError(f'config.sampler.mr_scales: {len(sc.mr_scales)} entries for the model\'s {n} scales '
                      f'(patch_nums {tuple(var_config.patch_nums)}); give one 0/1 per scale, or \'\' for all')
  return sc


def sampler_from_config(config, models=None):
  """(Sampler, var params, vae params) of the checkpoints the config names, placed on its mesh. `models`:
  what convert.loading.load_models returned for this config, when the caller keeps it (a study that
  samples one model many times reads its checkpoint once)."""
  var_config, var_params, vq, vae_params = models or load_models(config)
  mesh = pm.mesh_from_config(config)
  sc = sampler_config_for(config.sampler, var_config)  # Its errors name config.sampler's keys.
  try:
    sampler = Sampler(var_config, vq, sc, mesh=mesh, decode_precision=decode_precision(config.sampler))
  except ValueError as e:
    raise ConfigError(f'config.model / config.tokenizer do not fit together: {e}') from e
  rep = pm.replicated(mesh)
  return sampler, jax.device_put(var_params, rep), jax.device_put(vae_params, rep)


def sampling_batch(batch_size: int, num_images: int, n_par: int, key: str) -> int:
  """The batch to sample `num_images` with, given the configured `batch_size` (`key`): a positive multiple of
  the data-parallel size `n_par`, and no larger than the images need (rounded up to that multiple). A
  larger batch was padded to its size and computed in full (1,000,000 for 10 images asked for 106 GB):
  it is cut to the need, with a warning; the images are the same draws a batch of that size gives."""
  if batch_size < 1 or batch_size % n_par:
    raise ConfigError(f'{key}={batch_size} must be a positive multiple of the data-parallel size {n_par}')
  need = -(-max(num_images, 1) // n_par) * n_par
  if batch_size > need:
    logging.warning('%s=%d is larger than the %d image(s) to draw: sampling in batches of %d', key, batch_size,
                    num_images, need)
    return need
  return batch_size


def generate(sampler, var_params, vae_params, labels, batch_size: int, seed: int,
             key: str = 'batch_size', program=None) -> np.ndarray:
  """uint8 NHWC images for `labels`, batch by batch; batch i uses the key batch_rng(seed, i), so no two
  batches share noise. Each batch is split over the mesh's batch axes; the last one is padded to the
  compiled size and trimmed. `program` (var params, vae params, labels, key) -> (ids, images) draws a
  batch: by default `sampler.sample` jitted; a caller may give one it compiled (the guidance strengths
  an argument of it, say)."""
  mesh = sampler.mesh
  n_par = pm.data_parallel_size(mesh) if mesh is not None else 1
  # A batch above the count is allowed here: a study compiles one program for all its calls, small ones too.
  if batch_size < 1 or batch_size % n_par:
    raise ConfigError(f'{key}={batch_size} must be a positive multiple of the data-parallel size {n_par}')
  fn = program or jit_inference(sampler.sample)
  out, t0 = [], time.time()
  labels = np.asarray(labels, np.int32)
  for bi, start in enumerate(range(0, len(labels), batch_size)):
    lab = labels[start:start + batch_size]
    pad = batch_size - len(lab)
    full = np.concatenate([lab, np.repeat(lab[-1:], pad)])
    if mesh is not None:
      full = jax.device_put(full, NamedSharding(mesh, PartitionSpec(('data', 'fsdp'))))
    _, img = fn(var_params, vae_params, full, batch_rng(seed, bi))
    out.append(to_uint8(multihost.gather(img))[:len(lab)])
    done = start + len(lab)
    rate = done / (time.time() - t0)
    logging.info('sampled %d/%d images (%.2f img/s, ETA %.0fs)', done, len(labels), rate,
                 (len(labels) - done) / rate)
  return np.concatenate(out)
