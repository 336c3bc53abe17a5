"""Timing on the devices of this process: for each mask, depth and batch, the library's train step
(`Trainer.step_fn`, state donated, a batch of token ids (B, L) and labels as the token-cache path feeds
it) and the sampler (`Sampler.tokens` then `Sampler.decode`; cfg 1.5 linear, top-k 900, top-p 0.96).
Each program is lowered and compiled once and the compiled executable is what gets timed: `--warmup`
calls, then `--repeats` calls each ended by `block_until_ready`; `seconds` is their median. FLOP/s are
given twice, from the analytic count (`train_flops`, matmuls only) and from XLA's `cost_analysis()` of
the compiled step; utilisation divides the analytic rate by a matmul peak measured in the same run, on
the same device, in the same dtype.

Everything runs on random weights: the work of a step or of a sampling pass (shapes, FLOPs, memory)
does not depend on the weight values. The sampled tokens do, but top-k/top-p filter a fixed number of
logits per position whatever they hold, so the cost is that of a trained model.
"""
from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import time

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from srdd_jax.bench.base import (DECODE_PRECISION, RECORD_FIELDS, SAMPLER, error_info, log, model_config,
                                 model_fields, tokenizer_config, train_flops)
from srdd_jax.diffusion.sampler import Sampler, batch_rng
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel.compile import compiled_stats, jit_inference, jit_train_step, needed_bytes
from srdd_jax.tokenizer.api import Tokenizer, unbox
from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.train.optimizer import OptimConfig
from srdd_jax.train.step import Trainer, TrainState
from srdd_jax.transformer.config import VARConfig
from srdd_jax.transformer.model import VAR


# --- measurement helpers ---------------------------------------------------------------------------

def device_memory() -> dict | None:
  try:
    s = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not s:
    return None
  return {k: int(s[k]) for k in ('bytes_limit', 'bytes_in_use', 'peak_bytes_in_use',
                                 'largest_alloc_size') if k in s}


def time_calls(fn, repeats: int, warmup: int) -> list[float]:
  """Seconds of `repeats` calls of fn(), each ended by block_until_ready, after `warmup` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return times


def summary(times: list[float]) -> dict:
  return {'median_s': statistics.median(times), 'min_s': min(times), 'max_s': max(times),
          'all_s': [round(t, 6) for t in times]}


def environment() -> dict:
  d = jax.devices()[0]
  env = {
      'backend': jax.default_backend(), 'device_kind': d.device_kind, 'device_count': jax.device_count(),
      'jax': jax.__version__, 'jaxlib': getattr(jaxlib, '__version__', None), 'flax': flax.__version__,
      'optax': optax.__version__, 'python': platform.python_version(), 'numpy': np.__version__,
      'cpu_count': os.cpu_count(), 'XLA_FLAGS': os.environ.get('XLA_FLAGS'),
      'XLA_PYTHON_CLIENT_MEM_FRACTION': os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION'),
      'device_memory': device_memory(),
  }
  try:
    env['platform_version'] = d.client.platform_version
  except Exception:  # pylint: disable=broad-except
    pass
  return env


def matmul_peak(sizes, repeats: int, dtype: str = 'bfloat16') -> dict:
  """(n x n) @ (n x n) in `dtype` on random normal data, timed like the steps (each call blocked;
  median) and back to back (one block at the end). The peak is the best rate of any size and way."""
  out = {'dtype': dtype, 'sizes': {}}
  best = 0.0
  for n in sizes:
    ka, kb = jax.random.split(jax.random.PRNGKey(n))
    a = jax.random.normal(ka, (n, n), jnp.dtype(dtype))
    b = jax.random.normal(kb, (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x, y: x @ y)
    times = time_calls(lambda a=a, b=b: f(a, b), repeats, warmup=2)
    t = time.perf_counter()
    r = None
    for _ in range(repeats):
      r = f(a, b)
    jax.block_until_ready(r)
    pipelined = (time.perf_counter() - t) / repeats
    flops = 2.0 * n ** 3
    res = {'flops': flops, **summary(times), 'pipelined_mean_s': pipelined,
           'tflops_per_s_median': flops / statistics.median(times) / 1e12,
           'tflops_per_s_pipelined': flops / pipelined / 1e12}
    out['sizes'][str(n)] = res
    best = max(best, res['tflops_per_s_median'], res['tflops_per_s_pipelined'])
    log(f'matmul {dtype} {n}^3: {res["tflops_per_s_median"]:.3f} TFLOP/s per call, '
        f'{res["tflops_per_s_pipelined"]:.3f} back to back')
    del a, b, r
  out['peak_flops_per_s'] = best * 1e12
  return out


# --- random weights --------------------------------------------------------------------------------

def _fill(rng):
  """A tree_map_with_path function: kernels N(0, 1/fan_in), norm scales 1, biases and vectors 0."""
  def fill(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return np.zeros(leaf.shape, leaf.dtype)
    if name == 'scale':
      return np.ones(leaf.shape, leaf.dtype)
    if name == 'bias' or len(leaf.shape) <= 1:
      return np.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.standard_normal(leaf.shape, np.float32) / np.float32(math.sqrt(fan_in))).astype(leaf.dtype)
  return fill


def random_vae_params(vae_config: VQVAEConfig):
  """Random tokenizer weights drawn on the host into the shapes of `Tokenizer.abstract_params()`. A
  jitted `Tokenizer.init` would do too, but XLA takes ~20 s to compile its initialisers on a CPU."""
  abstract = unbox(Tokenizer(vae_config).abstract_params())
  return jax.device_put(jax.tree_util.tree_map_with_path(_fill(np.random.default_rng(1)), abstract))


def random_var_params(c: VARConfig) -> dict:
  """Random transformer weights on the host (numpy), in the shapes of VAR's parameters; drawn on the
  host because a jitted init costs a compile per depth."""
  x = jnp.zeros((1, c.seq_len - 1, c.z_channels), jnp.float32)
  abstract = unbox(jax.eval_shape(lambda: VAR(c).init(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32),
                                                       x)['params']))
  return jax.tree_util.tree_map_with_path(_fill(np.random.default_rng(0)), abstract)


def random_state(trainer: Trainer, host_params) -> TrainState:
  """A train state in its shardings: the given (host) parameters and zero optimiser moments (a fresh
  optimiser's; Adam's second moment must not be negative)."""
  abstract, shardings = trainer.abstract_state()
  zeros = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  host = zeros.replace(params=host_params,
                       ema_params=None if abstract.ema_params is None else host_params)
  return jax.device_put(host, shardings)


def tokenizer_info(vae: VQVAEConfig) -> dict:
  full = vae.ch == VQVAEConfig().ch
  return {'ch': vae.ch, 'ch_mult': list(vae.ch_mult), 'vocab_size': vae.vocab_size,
          'z_channels': vae.z_channels, 'full_size': full,
          'note': ("VAR's tokenizer (ch 160)" if full else
                   f'reduced tokenizer (ch {vae.ch} instead of 160): decoding costs less than with VAR\'s')}


def _empty(kind: str, c: VARConfig, batch: int) -> dict:
  rec = {k: None for k in RECORD_FIELDS}
  rec.update(kind=kind, **model_fields(c, batch))
  return rec


# --- timed runs ------------------------------------------------------------------------------------

def host_batch(c: VARConfig, batch: int, seed: int = 0) -> dict:
  """Token ids (B, L) and labels: what the token-cache training path feeds the step."""
  rng = np.random.default_rng(seed)
  return {'labels': rng.integers(0, c.num_classes, (batch,), dtype=np.int32),
          'ids': rng.integers(0, c.vocab_size, (batch, c.seq_len), dtype=np.int32)}


def bench_train(c: VARConfig, vae_c: VQVAEConfig, vae_params, host_params, mesh, batch: int,
                repeats: int, warmup: int, peak: float | None, compiled=None) -> dict:
  """One train record: the compiled step timed on random weights and random token ids. `compiled`:
  (executable, compile seconds) of `jit_train_step` compiled elsewhere for these shapes, or None."""
  rec = _empty('train', c, batch)
  trainer = Trainer(c, vae_c, OptimConfig(peak_lr=1e-4, total_steps=1000), mesh)
  state = random_state(trainer, host_params)
  data = trainer.shard_batch(host_batch(c, batch))
  vae_params = jax.device_put(vae_params, pm.replicated(mesh))
  if compiled is None:
    t = time.perf_counter()
    compiled = jit_train_step(trainer).lower(state, vae_params, data).compile()
    rec['compile_s'] = time.perf_counter() - t
  else:
    compiled, rec['compile_s'] = compiled
  stats = compiled_stats(compiled)
  holder = {'state': state}
  del state

  def one():
    holder['state'], holder['metrics'] = compiled(holder['state'], vae_params, data)
    return holder['state'], holder['metrics']

  times = time_calls(one, repeats, warmup)
  metrics = holder['metrics']  # The last timed step's: a finite loss shows the step ran for real.
  med = statistics.median(times)
  fl = train_flops(c, batch)
  rec.update(
      seconds=med, all_s=[round(x, 6) for x in times], tokens_per_s=batch * c.seq_len / med,
      images_per_s=batch / med, memory_bytes=needed_bytes(stats['memory']), memory=stats['memory'],
      params=sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(host_params)),
      analytic_flops=fl['train_per_step'], analytic_flops_useful=fl['train_per_step_useful'],
      analytic_flops_per_s=fl['train_per_step'] / med, xla_flops=stats['xla_flops'],
      xla_flops_per_s=stats['xla_flops'] / med if stats['xla_flops'] else None,
      xla_bytes_accessed=stats['xla_bytes_accessed'],
      utilisation=fl['train_per_step'] / med / peak if peak else None,
      utilisation_xla=stats['xla_flops'] / med / peak if peak and stats['xla_flops'] else None,
      loss=float(jax.device_get(metrics['loss'])))
  for k in ('cost_error', 'memory_error'):
    if k in stats:
      rec[k] = stats[k]
  return rec


def bench_sample(c: VARConfig, vae_c: VQVAEConfig, vae_params, host_params, mesh, batch: int,
                 repeats: int, warmup: int, decoders: dict, tokens=None) -> dict:
  """One sample record: the tokens program then the decoder, timed as one chain so one run gives the
  latency with and without decoding. `decoders` caches the compiled decoder per batch (it is the same
  for both masks and every depth); it is warmed up with the first tokens program that uses it.
  `tokens`: (executable, compile seconds) of the tokens program compiled elsewhere, or None."""
  rec = _empty('sample', c, batch)
  sampler = Sampler(c, vae_c, SAMPLER, mesh=mesh, decode_precision=DECODE_PRECISION)
  params = jax.device_put(host_params, pm.replicated(mesh))
  labels = jnp.arange(batch, dtype=jnp.int32) % c.num_classes
  if tokens is None:
    t = time.perf_counter()
    tokens = jit_inference(sampler.tokens).lower(params, vae_params, labels, batch_rng(0, 0)).compile()
    rec['compile_s'] = time.perf_counter() - t
  else:
    tokens, rec['compile_s'] = tokens
  stats = compiled_stats(tokens)
  # The decoder takes f_hat as the tokens program leaves it (split over the batch axes).
  f_sharding = tokens.output_shardings[1]
  key = (batch, f_sharding)
  if key not in decoders:
    f_shape = jax.ShapeDtypeStruct((batch, vae_c.latent_side, vae_c.latent_side, vae_c.z_channels),
                                   jnp.float32, sharding=f_sharding)
    t = time.perf_counter()
    dec = jit_inference(sampler.decode).lower(vae_params, f_shape).compile()
    decoders[key] = {'compiled': dec, 'compile_s': time.perf_counter() - t, 'stats': compiled_stats(dec),
                     'warm': False}
  decode, decode_compile_s, dec_stats = (decoders[key][k] for k in ('compiled', 'compile_s', 'stats'))
  for r in range(warmup):
    _, f_hat = jax.block_until_ready(tokens(params, vae_params, labels, batch_rng(0, r)))
    if not decoders[key]['warm']:  # Once per compiled decoder: its work does not depend on the mask.
      jax.block_until_ready(decode(vae_params, f_hat))
  decoders[key]['warm'] = decoders[key]['warm'] or warmup > 0
  tok_times, full_times = [], []
  for r in range(warmup, warmup + repeats):
    t0 = time.perf_counter()
    ids, f_hat = jax.block_until_ready(tokens(params, vae_params, labels, batch_rng(0, r)))
    t1 = time.perf_counter()
    images = jax.block_until_ready(decode(vae_params, f_hat))
    t2 = time.perf_counter()
    tok_times.append(t1 - t0)
    full_times.append(t2 - t0)
  full, tok = statistics.median(full_times), statistics.median(tok_times)
  img = np.asarray(jax.device_get(images), np.float32)
  rec.update(
      seconds=full, all_s=[round(x, 6) for x in full_times], images_per_s=batch / full,
      tokens_per_s=batch * c.seq_len / full,
      seconds_tokens_only=tok, images_per_s_tokens_only=batch / tok,
      tokens_per_s_tokens_only=batch * c.seq_len / tok,
      seconds_decode=statistics.median([f - x for f, x in zip(full_times, tok_times)]),
      memory_bytes=needed_bytes(stats['memory']), memory=stats['memory'],
      decode_memory_bytes=needed_bytes(dec_stats['memory']), decode_compile_s=decode_compile_s,
      xla_flops=stats['xla_flops'], decode_xla_flops=dec_stats['xla_flops'],
      sampler=dataclasses.asdict(SAMPLER), tokenizer=tokenizer_info(vae_c),
      sanity={'image_shape': list(img.shape), 'image_finite': bool(np.isfinite(img).all()),
              'ids_max': int(max(int(np.asarray(i).max()) for i in ids))})
  return rec


def run_timed(depths, batches, sample_batches, masks, dtype: str, repeats: int, warmup: int,
              tokenizer_ch: int, peak: float | None, width: int = 0, heads: int = 0, patch_nums=None,
              kinds=('train', 'sample'), on_record=None, model=None) -> list[dict]:
  """Timed records for every (depth, mask, batch) of `kinds`; a failure becomes a record with its
  error. `width`/`heads`/`patch_nums` override VAR's sizes (tiny test models)."""
  mesh = pm.make_mesh()
  records = []
  vae_cache = {}
  decoders = {}

  def add(rec):
    records.append(rec)
    if on_record is not None:
      on_record(rec)

  for depth in depths:
    host_params = None
    for mask in masks:
      c = model_config(depth, mask, dtype, width, heads, patch_nums, **(model or {}))
      vae_c = tokenizer_config(c, tokenizer_ch)
      if vae_c not in vae_cache:
        vae_cache.clear()
        decoders.clear()
        vae_cache[vae_c] = random_vae_params(vae_c)
      vae_params = vae_cache[vae_c]
      if host_params is None:  # The parameters do not depend on the mask.
        host_params = random_var_params(c)
      jobs = [('train', b) for b in batches if 'train' in kinds]
      jobs += [('sample', b) for b in sample_batches if 'sample' in kinds]
      for kind, b in jobs:
        log(f'{kind} {mask} depth {depth} width {c.width} batch {b}')
        try:
          if kind == 'train':
            rec = bench_train(c, vae_c, vae_params, host_params, mesh, b, repeats, warmup, peak)
          else:
            rec = bench_sample(c, vae_c, vae_params, host_params, mesh, b, repeats, warmup, decoders)
        except Exception as e:  # pylint: disable=broad-except
          rec = {**_empty(kind, c, b), **error_info(e)}
          log(f'  failed: {rec["error"].splitlines()[0][:300]}')
        else:
          log(f'  {rec["seconds"]:.3f} s, ' + (f'{rec["tokens_per_s"]:,.0f} tokens/s'
                                               if kind == 'train' else f'{rec["images_per_s"]:.2f} img/s'))
        add(rec)
  return records
