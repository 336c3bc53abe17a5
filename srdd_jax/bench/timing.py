"""Throughput and memory of the train step and the sampler, both masks, over depths and batch sizes.

  python -m srdd_jax.bench --out /tmp/bench.json [--quick]
  python -m srdd_jax.bench --out /tmp/bench.json --depths 16,20 --batches 32,64 --masks markov,causal
  python -m srdd_jax.bench --aot v5p:4x4x4 --preset d30 --batch 1024 --out /tmp/aot.json
  python -m srdd_jax.bench --vs-var DIR --out /tmp/vs.json [--quick]     # and the official PyTorch VAR
  python -m srdd_jax.bench --suite gpu --vs-var DIR --out /tmp/gpu.json  # d16 + d24, one H100/H200 run
  python -m srdd_jax.bench --suite gpu --tiny --vs-var DIR --out /tmp/t.json   # its CPU dry run

Side by side (`--vs-var DIR`, DIR a checkout of github.com/FoundationVision/VAR; torch needed for this
flag only, and without it or without such a DIR the command exits 2 before timing anything): the same
shapes, masks and batches timed with VAR's own PyTorch code in a process of its own
(`srdd_jax/bench/var_pytorch.py`: VAR's train step with bfloat16 autocast on a GPU and fused AdamW, and
`autoregressive_infer_cfg` with decoding; the markov mask applied to VAR's code as its docstring
says), both record sets and their ratios in one JSON (OUT) and one Markdown table (OUT, suffix .md).
`--suite gpu` is the whole GPU comparison in one call inside `--budget_s` (default 480 s): d16 and
d24, 256 px, bfloat16, both masks, train and sampling, both implementations at the largest batch that
fits both; MFU against the nominal 989 TFLOP/s of an H100/H200. `srdd_jax/bench/vs_var.py` has the
details and the JSON's fields.

Timing (on the devices of this process): for each mask, depth and batch, the library's train step
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

Ahead of time (`--aot TOPOLOGY`): no TPU is needed. `jax.experimental.topologies` describes the chips
of, say, `v5p:2x2x2` (libtpu must be installed: `pip install -e '.[tpu]'`), the mesh is built on those
devices, and the real train step and the tokens program are compiled for them from abstract shapes
with shardings. Reported per chip: XLA's memory analysis (arguments, outputs, temporaries, aliased,
generated code), its FLOP and bytes-accessed counts, and whether the program fits in 80% of the chip's
HBM (`HBM_BYTES`).

The JSON (rewritten after every record, so a killed run keeps what it measured):
  schema 'srdd_jax.bench/1'; env: backend, device_kind, device_count, jax, jaxlib, flax, optax, numpy,
  python, cpu_count, XLA_FLAGS, device_memory; args; weights; started; wall_s;
  matmul_peak (timed runs): dtype, sizes {n: times, TFLOP/s}, peak_flops_per_s;
  aot (--aot runs): topology, preset, dtype, mesh_request, rules, hbm_bytes_table, fit_fraction;
  records: one per (kind, mask, depth, batch), in run order:
    every kind: mode (the mask), kind, depth, width, batch, dtype, compile_s, memory_bytes (XLA's
      arguments + outputs + temporaries - aliased, per device), or error + traceback on failure;
    train: heads, seq_len, seconds (median s/step), all_s, tokens_per_s, images_per_s, params,
      analytic_flops(_useful), analytic_flops_per_s, xla_flops, xla_flops_per_s, xla_bytes_accessed,
      utilisation (analytic FLOP/s over the measured matmul peak), utilisation_xla, memory, loss;
    sample: seconds (median s/batch, tokens + decode), images_per_s, tokens_per_s,
      seconds_tokens_only, images_per_s_tokens_only, seconds_decode, memory_bytes (tokens program),
      decode_memory_bytes, decode_compile_s, xla_flops, decode_xla_flops, sampler, tokenizer (ch,
      full_size: whether it is VAR's ch-160 tokenizer), sanity;
    aot_train / aot_sample: topology, chips, device_kind, mesh, rules, per_chip_bytes, memory
      (argument/output/temp/alias/generated_code _size_in_bytes), generated_code_bytes, xla_flops and
      xla_bytes_accessed (per chip), hbm_bytes, fits (per_chip_bytes <= 80% of HBM),
      analytic_flops_per_chip (train).
A Markdown table of the records is printed at the end. A configuration that fails records its error
and the run goes on.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from srdd_jax import files
from srdd_jax.config import ConfigError, ints
from srdd_jax.diffusion.filtering import SamplerConfig
from srdd_jax.diffusion.sampler import Sampler, batch_rng
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import compile as pc
# hbm_bytes is imported for this module's API too (tests read timing.hbm_bytes).
from srdd_jax.parallel.compile import (FIT_FRACTION, abstract, aot_record, aot_train_step, compiled_stats,
                                       hbm_bytes, jit_inference, jit_train_step, needed_bytes, rules_for,
                                       topology_devices)
from srdd_jax.tokenizer.api import Tokenizer, unbox
from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.train.optimizer import OptimConfig
from srdd_jax.train.step import Trainer, TrainState
from srdd_jax.transformer import flops
from srdd_jax.transformer.config import MASKS, VARConfig, preset
from srdd_jax.transformer.model import VAR

SCHEMA = 'srdd_jax.bench/1'
# The evaluation protocol of VAR's paper; the sampler's cost depends on it (guidance doubles the batch).
SAMPLER = SamplerConfig(cfg=1.5, cfg_schedule='linear', top_k=900, top_p=0.96)
# Sampling decodes at the accelerator's default matmul precision, as config.sampler.decode_precision does.
DECODE_PRECISION = 'default'
# Chip HBM in bytes, by the topology's prefix (Google Cloud's published capacities).
HBM_BYTES = dict(pc.HBM_BYTES)  # By a substring of the chip's name.
# Every timed record has these keys (None where they do not apply); AOT records have AOT_FIELDS.
RECORD_FIELDS = ('mode', 'kind', 'depth', 'width', 'heads', 'seq_len', 'batch', 'dtype', 'seconds',
                 'all_s', 'tokens_per_s', 'images_per_s', 'memory_bytes', 'compile_s')
AOT_FIELDS = ('mode', 'kind', 'depth', 'width', 'batch', 'dtype', 'topology', 'chips', 'mesh', 'rules',
              'per_chip_bytes', 'memory', 'xla_flops', 'xla_bytes_accessed', 'hbm_bytes', 'fits',
              'compile_s')
_T0 = time.perf_counter()


def log(msg: str) -> None:
  print(f'[{time.strftime("%H:%M:%S")} +{time.perf_counter() - _T0:6.1f}s] {msg}', file=sys.stderr,
        flush=True)


def error_info(e: BaseException) -> dict:
  """{'error': 'Type: message' (shortened), 'traceback': the formatted traceback (shortened)}."""
  msg = f'{type(e).__name__}: {e}'
  tb = ''.join(traceback.format_exception(type(e), e, e.__traceback__))
  return {'error': msg if len(msg) < 3000 else msg[:3000] + ' ...',
          'traceback': tb if len(tb) < 6000 else tb[:1500] + '\n...\n' + tb[-4500:]}


# --- FLOP counts -----------------------------------------------------------------------------------

def train_flops(c: VARConfig, batch: int) -> dict:
  """Analytic FLOPs of one train step (`srdd_jax.transformer.flops`): 'train_per_step' counts the
  attention pairs the code computes, 'train_per_step_useful' those the mask keeps."""
  f = flops.forward_flops(c)
  return {'weights_per_token': f['weights_per_token'], 'weights_per_image': f['weights_per_image'],
          'forward_per_image_dense': f['dense'], 'forward_per_image_attention': f['attention_computed'],
          'forward_per_image_attention_useful': f['attention'],
          'train_per_step': 3 * batch * (f['dense'] + f['attention_computed']),
          'train_per_step_useful': 3 * batch * f['total']}


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


def gb(x) -> str:
  return '-' if x is None else f'{x / 2**30:.2f}'


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


# --- configurations --------------------------------------------------------------------------------

def model_config(depth: int, mask: str, dtype: str, width: int = 0, heads: int = 0,
                 patch_nums=None, **model) -> VARConfig:
  """VAR at `depth` (width 64 * depth, depth heads unless given), 256 px, vocabulary 4096, Cvae 32;
  `model`: further VARConfig fields (scan_blocks, remat, attention)."""
  kw = {} if patch_nums is None else {'patch_nums': tuple(patch_nums)}
  return VARConfig(depth=depth, width=width, num_heads=heads, mask=mask, dtype=dtype, **kw, **model)


def tokenizer_config(var_config: VARConfig, ch: int) -> VQVAEConfig:
  """VAR's tokenizer (ch 160) or the same architecture with `ch` channels, matching the transformer."""
  return VQVAEConfig(vocab_size=var_config.vocab_size, z_channels=var_config.z_channels, ch=ch,
                     patch_nums=var_config.patch_nums)


def tokenizer_info(vae: VQVAEConfig) -> dict:
  full = vae.ch == VQVAEConfig().ch
  return {'ch': vae.ch, 'ch_mult': list(vae.ch_mult), 'vocab_size': vae.vocab_size,
          'z_channels': vae.z_channels, 'full_size': full,
          'note': ("VAR's tokenizer (ch 160)" if full else
                   f'reduced tokenizer (ch {vae.ch} instead of 160): decoding costs less than with VAR\'s')}


def _model_fields(c: VARConfig, batch: int) -> dict:
  return {'mode': c.mask, 'depth': c.depth, 'width': c.width, 'heads': c.num_heads, 'seq_len': c.seq_len,
          'batch': batch, 'dtype': c.dtype}


def _empty(kind: str, c: VARConfig, batch: int) -> dict:
  rec = {k: None for k in RECORD_FIELDS}
  rec.update(kind=kind, **_model_fields(c, batch))
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


# --- ahead of time, for a TPU topology -------------------------------------------------------------

def _aot_record(kind, c, batch, topology, devices, mesh, rules_name, compiled, compile_s) -> dict:
  rec = {**_model_fields(c, batch), 'kind': kind, 'rules': rules_name,
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
        rec = {**_model_fields(c, batch if kind == 'train' else sample_batch), 'kind': f'aot_{kind}',
               'topology': topology, 'chips': len(devices), **error_info(e)}
        log(f'  failed: {rec["error"].splitlines()[0][:300]}')
      records.append(rec)
      if on_record is not None:
        on_record(rec)
  return records


# --- the report ------------------------------------------------------------------------------------

def _f(x, spec):
  return '-' if x is None else format(x, spec)


def markdown_table(records) -> str:
  """The timed records, then the AOT records, as Markdown tables."""
  timed = [r for r in records if r.get('kind') in ('train', 'sample')]
  aot = [r for r in records if str(r.get('kind', '')).startswith('aot_')]
  lines = []
  if timed:
    lines += ['| mode | kind | depth | width | batch | s (median) | tokens/s | images/s | images/s tokens only '
              '| TFLOP/s analytic | TFLOP/s XLA | utilisation | memory GiB |',
              '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in timed:
      if 'error' in r:
        lines.append(f'| {r["mode"]} | {r["kind"]} | {r["depth"]} | {r["width"]} | {r["batch"]} | error: '
                     f'{r["error"].splitlines()[0][:120]} | | | | | | | |')
        continue
      tf = lambda k: _f(r.get(k) and r[k] / 1e12, '.4g')
      lines.append(
          f'| {r["mode"]} | {r["kind"]} | {r["depth"]} | {r["width"]} | {r["batch"]} | {r["seconds"]:.3f} | '
          f'{_f(r.get("tokens_per_s"), ",.0f")} | {_f(r.get("images_per_s"), ".2f")} | '
          f'{_f(r.get("images_per_s_tokens_only"), ".2f")} | {tf("analytic_flops_per_s")} | '
          f'{tf("xla_flops_per_s")} | {_f(r.get("utilisation"), ".3f")} | {gb(r.get("memory_bytes"))} |')
  if aot:
    if lines:
      lines.append('')
    lines += ['| mode | kind | topology | chips | mesh | depth | batch | GiB per chip | of HBM GiB | fits 80% '
              '| TFLOP per chip | GB accessed per chip | code MiB | compile s |',
              '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in aot:
      if 'error' in r:
        lines.append(f'| {r["mode"]} | {r["kind"]} | {r["topology"]} | {r["chips"]} | | {r["depth"]} | '
                     f'{r["batch"]} | error: {r["error"].splitlines()[0][:120]} | | | | | | |')
        continue
      mesh = 'x'.join(str(v) for v in r['mesh'].values())
      lines.append(
          f'| {r["mode"]} | {r["kind"]} | {r["topology"]} | {r["chips"]} | {mesh} | {r["depth"]} | '
          f'{r["batch"]} | {gb(r["per_chip_bytes"])} | {gb(r["hbm_bytes"])} | {r["fits"]} | '
          f'{_f(r.get("xla_flops") and r["xla_flops"] / 1e12, ".4g")} | '
          f'{_f(r.get("xla_bytes_accessed") and r["xla_bytes_accessed"] / 1e9, ".4g")} | '
          f'{_f(r.get("generated_code_bytes") and r["generated_code_bytes"] / 2**20, ".2f")} | '
          f'{r["compile_s"]:.1f} |')
  return '\n'.join(lines)


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--out', required=True, help='JSON file to write (rewritten after every record)')
  ap.add_argument('--quick', action='store_true',
                  help='depth 6, width 384, 6 heads, 256 px, float32, train batch 8, sample batch 32, '
                       '2 repeats after 1 warm-up; a reduced tokenizer (ch 32) on a CPU')
  ap.add_argument('--depths', default=None, help='comma-separated depths (width 64 * depth); '
                  'default 16,20,24,30 on an accelerator, 6 on a CPU')
  ap.add_argument('--width', type=int, default=0, help='transformer width (0: 64 * depth)')
  ap.add_argument('--heads', type=int, default=0, help='attention heads (0: depth)')
  ap.add_argument('--batches', default=None, help='train global batch sizes; default 64 on an '
                  'accelerator, 8 on a CPU')
  ap.add_argument('--sample_batches', default=None, help='sampling batch sizes; default 32')
  ap.add_argument('--masks', default='markov,causal', help='masks, in run order')
  ap.add_argument('--kinds', default='train,sample', help='what to run: train, sample or both')
  ap.add_argument('--dtype', default=None, help='compute dtype; default bfloat16 on an accelerator '
                  'and for --aot, float32 on a CPU and for --quick')
  ap.add_argument('--repeats', type=int, default=None, help='timed calls per program (default 5, '
                  '--quick 2)')
  ap.add_argument('--warmup', type=int, default=1, help='untimed calls before them')
  ap.add_argument('--tokenizer_ch', type=int, default=None,
                  help="decoder channels (160: VAR's tokenizer; default 160, or 32 for --quick on a CPU)")
  ap.add_argument('--aot', default=None, metavar='TOPOLOGY',
                  help='compile for a TPU topology (v5e:2x2, v5p:4x4x4) ahead of time instead of timing')
  ap.add_argument('--preset', default=None, help='--aot model: d16, d20, d24, d30 (default d16)')
  ap.add_argument('--batch', type=int, default=None, help='--aot train global batch (default 256)')
  ap.add_argument('--sample_batch', type=int, default=None, help='--aot sampling batch (default --batch)')
  ap.add_argument('--mesh', default='1,-1,1', help='--aot mesh sizes data,fsdp,tensor; -1 fills '
                  '(default: every chip on fsdp, as the project\'s FSDP rules)')
  ap.add_argument('--rules', default='fsdp', help='--aot parameter placement: fsdp or replicated')
  ap.add_argument('--scan', type=int, default=None, choices=(0, 1),
                  help='blocks under nn.scan (1) or unrolled (0); default 1, 0 for timed runs on a CPU '
                       '(XLA:CPU runs unrolled blocks faster)''')
  ap.add_argument('--remat', default=None, choices=('none', 'dots', 'full'),
                  help='what the backward recomputes (config.model.remat); default none, dots for --suite')
  ap.add_argument('--attention', default=None, choices=('auto', 'xla', 'cudnn', 'splash'),
                  help='attention implementation; default splash with --aot (the host is no TPU), else auto')
  ap.add_argument('--patch_nums', default=None, help='timed runs: comma-separated scales (default VAR\'s '
                  '256 px: 1,2,3,4,5,6,8,10,13,16); small ones make tiny test models')
  ap.add_argument('--vs-var', dest='vs_var', default=None, metavar='DIR',
                  help='also time the official PyTorch VAR code of the checkout DIR (torch needed) on the '
                       'same shapes, in its own process; one JSON (OUT) and one Markdown table (OUT .md) '
                       'with both record sets and their ratios (srdd_jax.bench.vs_var)')
  ap.add_argument('--suite', default=None, choices=('gpu',),
                  help='gpu: d16 and d24 at 256 px, bfloat16, both masks, train and sampling at the largest '
                       'batch that fits, under --budget_s (srdd_jax.bench.vs_var)')
  ap.add_argument('--tiny', action='store_true', help='--suite at tiny sizes: a CPU dry run of its path')
  ap.add_argument('--budget_s', type=float, default=480.0, help='--suite: seconds for all of it (default 480)')
  ap.add_argument('--max_batch', type=int, default=None, help='--suite: largest train batch tried (1024)')
  ap.add_argument('--max_sample_batch', type=int, default=None,
                  help='--suite: largest sampling batch tried (128)')
  ap.add_argument('--memory_limit_gib', type=float, default=None,
                  help='--suite: our side fits its batches into this much memory instead of the device\'s '
                       '(dry runs of the fitting on a CPU)')
  ap.add_argument('--commit', default=None, help='recorded commit (default: git rev-parse HEAD, else '
                  '$SRDD_COMMIT)')
  args = ap.parse_args(argv)
  for m in args.masks.split(','):
    if m.strip() not in MASKS:
      ap.error(f'--masks {args.masks!r}: {m.strip()!r} is not one of {MASKS}')
  args.masks = tuple(m.strip() for m in args.masks.split(',') if m.strip())
  args.kinds = tuple(k.strip() for k in args.kinds.split(',') if k.strip())
  for k in args.kinds:
    if k not in ('train', 'sample'):
      ap.error(f'--kinds {k!r}: must be train or sample')
  if args.dtype is not None and args.dtype not in ('float32', 'bfloat16'):
    ap.error(f'--dtype {args.dtype!r}: must be float32 or bfloat16')
  if args.rules not in ('fsdp', 'replicated'):
    ap.error(f'--rules {args.rules!r}: must be fsdp or replicated')
  for flag in ('repeats', 'batch', 'sample_batch', 'tokenizer_ch', 'max_batch', 'max_sample_batch'):
    v = getattr(args, flag)
    if v is not None and v < 1:
      ap.error(f'--{flag} {v}: must be >= 1')
  if args.warmup < 0:
    ap.error(f'--warmup {args.warmup}: must be >= 0')
  if args.budget_s <= 0:
    ap.error(f'--budget_s {args.budget_s}: must be > 0')
  if args.tiny and not args.suite:
    ap.error('--tiny is for --suite')
  if args.aot and (args.vs_var is not None or args.suite):
    ap.error('--aot compiles for a TPU without timing: it takes neither --vs-var nor --suite')
  if args.aot is None:
    for flag in ('preset', 'batch', 'sample_batch'):
      if getattr(args, flag) is not None:
        ap.error(f'--{flag} is for --aot; timed runs use --depths, --batches and --sample_batches')
  return args


def fail(msg: str) -> None:
  """One `error:` line, exit status 2 (bad input: no traceback)."""
  print(f'error: {msg}', file=sys.stderr, flush=True)
  sys.exit(2)


def main(argv=None):
  args = parse_args(argv)
  try:  # The comma-separated flags, read before anything runs ('' or absent: the default).
    mesh_shape, depths, batches, sample_batches = (
        ints(v or '', f) for v, f in ((args.mesh, '--mesh'), (args.depths, '--depths'),
                                      (args.batches, '--batches'), (args.sample_batches, '--sample_batches')))
    patch_nums = ints(args.patch_nums, '--patch_nums') if args.patch_nums else None
  except ConfigError as e:
    fail(str(e))
  for flag, values in (('--depths', depths), ('--batches', batches), ('--sample_batches', sample_batches),
                       ('--patch_nums', patch_nums or ())):
    if any(v < 1 for v in values):
      fail(f'{flag} {",".join(map(str, values))}: every value must be >= 1')
  if patch_nums and any(b <= a for a, b in zip(patch_nums, patch_nums[1:])):
    fail(f'--patch_nums {args.patch_nums}: the sides must increase strictly')
  if args.vs_var is not None or args.suite:
    from srdd_jax.bench import vs_var  # pylint: disable=import-outside-toplevel
    return vs_var.main(args, sys.argv if argv is None else list(argv))
  results = {'schema': SCHEMA, 'argv': sys.argv if argv is None else list(argv), 'args': vars(args),
             'weights': 'random: the cost of a step or a sampling pass does not depend on the values',
             'started': time.strftime('%Y-%m-%d %H:%M:%S'), 'env': environment(), 'records': []}

  def save(_=None):
    results['wall_s'] = time.perf_counter() - _T0
    files.write_text(args.out, json.dumps(results, indent=1, default=str))

  def on_record(rec):
    results['records'].append(rec)
    save()

  env = results['env']
  log(f'bench: {env["device_kind"]} ({env["backend"]}, {env["device_count"]} devices), jax {env["jax"]}')
  if args.aot:
    dtype = args.dtype or 'bfloat16'
    try:
      base = preset(args.preset or 'd16', dtype=dtype, scan_blocks=args.scan != 0, remat=args.remat or 'none',
                    attention=args.attention or 'splash')
    except ValueError as e:
      fail(f'--preset: {e}')
    batch = args.batch or 256
    if not mesh_shape:
      fail(f'--mesh {args.mesh!r}: expected the sizes data,fsdp,tensor')
    results['aot'] = {'topology': args.aot, 'preset': args.preset or 'd16', 'dtype': dtype,
                      'mesh_request': list(mesh_shape), 'rules': args.rules, 'hbm_bytes_table': HBM_BYTES,
                      'fit_fraction': FIT_FRACTION}
    try:
      run_aot(args.aot, base, args.masks, batch, args.sample_batch or batch, mesh_shape, args.rules,
              args.kinds, args.tokenizer_ch or 160, on_record)
    except (ValueError, RuntimeError) as e:
      fail(str(e))
  else:
    accel = env['backend'] != 'cpu'
    # --quick is the issue's reference configuration, float32 everywhere.
    dtype = args.dtype or ('bfloat16' if accel and not args.quick else 'float32')
    depths = depths or ((6,) if args.quick or not accel else (16, 20, 24, 30))
    batches = batches or ((64,) if accel and not args.quick else (8,))
    sample_batches = sample_batches or (32,)
    repeats = args.repeats or (2 if args.quick else 5)
    ch = args.tokenizer_ch or (32 if args.quick and not accel else 160)
    sizes = (1024, 2048) if not accel else (4096, 8192)
    model = dict(scan_blocks=bool(accel if args.scan is None else args.scan), remat=args.remat or 'none',
                 attention=args.attention or 'auto')
    # What the flags resolved to here, so a second implementation can run the same shapes (--vs-var).
    results['resolved'] = {'depths': list(depths), 'batches': list(batches), 'sample_batches': list(sample_batches),
                           'masks': list(args.masks), 'kinds': list(args.kinds), 'dtype': dtype,
                           'repeats': repeats, 'warmup': args.warmup, 'tokenizer_ch': ch,
                           'patch_nums': list(patch_nums or VARConfig().patch_nums), 'width': args.width,
                           'heads': args.heads, **model}
    results['matmul_peak'] = matmul_peak(sizes, 3 if not accel else 10, dtype)
    save()
    run_timed(depths, batches, sample_batches, args.masks, dtype, repeats, args.warmup, ch,
              results['matmul_peak']['peak_flops_per_s'], args.width, args.heads, patch_nums=patch_nums,
              kinds=args.kinds, on_record=on_record, model=model)
  save()
  log(f'wrote {args.out}')
  print(markdown_table(results['records']), flush=True)
  print(f'\nWall time: {results["wall_s"]:.1f} s', flush=True)


if __name__ == '__main__':
  sys.exit(main())
