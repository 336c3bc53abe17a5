"""One-shot GPU timing of d16 / 256 px / bfloat16: train step, sampler, cuDNN attention; both masks.

  python -m benchmarks.gpu_timing --out /tmp/gpu_timing.json          # the H100 run (~3-5 min)
  python -m benchmarks.gpu_timing --quick --out /tmp/gpu_quick.json   # tiny sizes, CPU smoke test

Everything runs on **random weights**: the work of a step or of a sampling pass does not depend on the
weight values (the sampled tokens do, their cost does not). Sections (`--sections`, all by default):

- `train`: the library's jitted, donated train step (`Trainer.make_step`) on batches of token ids (no
  tokenizer encoder in the step), global batch `--batch`. Each program is lowered and compiled once;
  the compiled executable is what gets timed, so nothing is compiled twice. 2 warm-up steps, then
  `--steps` steps each ended by `jax.block_until_ready` (median reported), then the same number
  back to back with one block at the end (pipelined mean). FLOPs: `srdd_jax.bench.train_flops` (analytic) and
  XLA's `cost_analysis()` of the compiled step; MFU against a bf16 matmul peak measured in this run
  and against the nominal H100 SXM dense bf16 peak (989 TFLOP/s). If the step does not fit in device
  memory, the same global batch is retried with gradient accumulation (2, 4, ... micro-batches) and
  every failed try is recorded. The train state is initialised once (`Trainer.init`) and carried from
  one mask's run to the next (same shapes; the values do not change the work).
- `sample`: `Sampler.tokens` (cfg 1.5 linear, top-k 900, top-p 0.96) and `Sampler.decode` through a
  VAR-size tokenizer (ch 160). `Sampler.sample` is exactly `tokens` then `decode`; they are compiled
  as two programs so the decoder (the same for both masks) compiles once, and one timed chain gives
  both the tokens-only and the tokens + decode time. Median of `--sample_repeats` after a warm-up.
  An extra line times the decoder at the tokenizer's `precision='default'` (the library default,
  'highest', keeps it in true float32). Transformer weights: the train section's last parameters,
  else one random initialisation for both masks.
- `attention`: `jax.nn.dot_product_attention` (implementation 'cudnn', None and 'xla') against the
  project's attention (`srdd_jax.transformer.attention`) computed in float32 at 'highest' matmul
  precision, with the dense causal mask and the block-diagonal markov mask (also cuDNN per scale,
  without a mask), forward only, at d16's 16 heads x 64 and L = 680, batch 4. On a CPU the cuDNN
  calls are skipped with a note.

Order: environment, matmul peak, train, sample, attention, then the precision='default' decoder.
Every section (and every mask inside it) records its exception text in the JSON and the run goes on;
the JSON is rewritten after every part, so a run killed by a timeout (or a crash) still leaves what it
measured. A part is only started while the elapsed time is under `--budget_s` (300 s; the attention
check, which is cheap, 60 s more).
"""
import os

# Before JAX starts: let the train step use most of the card (JAX's default is 75%).
os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.90')

import argparse  # pylint: disable=wrong-import-position
import contextlib
import dataclasses
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax import bench
from srdd_jax.bench import (device_memory, error_info, gb, random_vae_params, summary, time_calls,
                            train_flops)
from srdd_jax.diffusion.filtering import SamplerConfig
from srdd_jax.diffusion.sampler import Sampler, batch_rng
from srdd_jax.parallel.compile import compiled_stats, jit_inference, needed_bytes
from srdd_jax.parallel.mesh import make_mesh
from srdd_jax.transformer.flops import attention_pairs
from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.train.optimizer import OptimConfig
from srdd_jax.train.step import Trainer
from srdd_jax.transformer import attention
from srdd_jax.transformer.config import VARConfig, preset

NOMINAL_H100_SXM_BF16_DENSE = 989e12  # FLOP/s, NVIDIA's datasheet figure without sparsity.
MASK_ORDER = ('markov', 'causal')  # Run order (the table shows causal first).
ATTENTION_EXTRA_S = 60  # The attention check is cheap: it may start this long after --budget_s.
_T0 = time.perf_counter()


def log(msg: str) -> None:
  print(f'[{time.strftime("%H:%M:%S")} +{time.perf_counter() - _T0:6.1f}s] {msg}', flush=True)


def elapsed() -> float:
  return time.perf_counter() - _T0


def is_oom(e: BaseException) -> bool:
  s = str(e)
  return 'RESOURCE_EXHAUSTED' in s or 'out of memory' in s.lower()


# --- configurations --------------------------------------------------------------------------------

def configs(quick: bool, mask: str, precision: str = 'highest'):
  """(VARConfig, VQVAEConfig): d16 at 256 px with VAR's ch-160 tokenizer, or the tiny --quick pair."""
  if quick:
    pn = (1, 2, 3, 4)
    var = VARConfig(depth=2, width=128, vocab_size=1024, z_channels=16, patch_nums=pn, dtype='bfloat16',
                    mask=mask)
    vae = VQVAEConfig(vocab_size=1024, z_channels=16, ch=32, ch_mult=(1, 2), patch_nums=pn,
                      precision=precision)
  else:
    var = preset('d16', dtype='bfloat16', mask=mask)
    vae = VQVAEConfig(patch_nums=var.patch_nums, precision=precision)  # vocab 4096, z 32, ch 160.
  return var, vae


# --- sections --------------------------------------------------------------------------------------

def environment() -> dict:
  env = bench.environment()
  try:
    env['environment_info'] = jax.print_environment_info(return_string=True)
  except Exception as e:  # pylint: disable=broad-except
    env['environment_info'] = repr(e)
  return env


def matmul_peak(sizes, repeats: int) -> dict:
  """The bf16 peak of `srdd_jax.bench.matmul_peak`, with the nominal H100 figure beside it."""
  out = bench.matmul_peak(sizes, repeats, 'bfloat16')
  out['nominal_h100_sxm_bf16_dense_flops_per_s'] = NOMINAL_H100_SXM_BF16_DENSE
  return out


def random_var_params(c: VARConfig):
  """The transformer's random weights (drawn on the host, no compile) on the device."""
  return jax.device_put(bench.random_var_params(c))


def _usable(tree) -> bool:
  leaves = jax.tree_util.tree_leaves(tree)
  return bool(leaves) and not any(getattr(x, 'is_deleted', lambda: False)() for x in leaves)


def train_once(var_config, vae_config, vae_params, mesh, batch: int, accum: int, steps: int,
               peak: float | None, pool: dict) -> dict:
  """Compiles and times the step. The train state (the same shapes and shardings for both masks) is
  `Trainer.init`'s the first time and after that the one the previous run left in `pool['state']`:
  the values do not change the work, and each init costs a compile."""
  c = var_config
  trainer = Trainer(c, vae_config, OptimConfig(peak_lr=1e-4, total_steps=1000), mesh, accum_steps=accum)
  state, pool['state'] = pool.get('state'), None
  if state is None or not _usable(state):
    state = None  # Drop a donated (deleted) one before allocating the next.
    t = time.perf_counter()
    state = jax.block_until_ready(trainer.init(jax.random.PRNGKey(0)))
    log(f'  Trainer.init: {time.perf_counter() - t:.1f}s')
  holder = {'state': state}
  try:
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
    rng = np.random.default_rng(0)
    host = {'labels': rng.integers(0, c.num_classes, (batch,), dtype=np.int32),
            'ids': rng.integers(0, c.vocab_size, (batch, c.seq_len), dtype=np.int32)}
    data = trainer.shard_batch(host)
    step, frozen = trainer.make_step(), trainer.place_frozen(vae_params)
    t = time.perf_counter()
    compiled = step.lower(state, frozen, data).compile()
    compile_s = time.perf_counter() - t
    stats = compiled_stats(compiled)
    need = needed_bytes(stats['memory'])
    log(f'  compiled in {compile_s:.1f}s; XLA: needs {gb(need)} GiB (temporaries '
        f'{gb((stats["memory"] or {}).get("temp_size_in_bytes"))} GiB)')
    limit = (device_memory() or {}).get('bytes_limit')
    if limit and need and need > 1.02 * limit:
      raise MemoryError(f'RESOURCE_EXHAUSTED (predicted): the compiled step needs {need} bytes, the '
                        f'device allows {limit}')

    def one():
      holder['state'], m = compiled(holder['state'], frozen, data)
      return holder['state'], m

    times = time_calls(one, steps, warmup=2)
    t = time.perf_counter()
    m = None
    for _ in range(steps):
      _, m = one()
    jax.block_until_ready((holder['state'], m))
    pipelined = (time.perf_counter() - t) / steps
    metrics = {k: float(v) for k, v in jax.device_get(m).items()}
    med = statistics.median(times)
    fl = train_flops(c, batch)
    out = {
        'global_batch': batch, 'accum_steps': accum, 'micro_batch': batch // accum, 'steps_timed': steps,
        'tokens_per_image': c.seq_len, 'params': n_params, 'compile_s': compile_s,
        **summary(times), 'pipelined_mean_s': pipelined,
        'images_per_s': batch / med, 'tokens_per_s': batch * c.seq_len / med,
        'analytic_flops': fl, 'xla_flops': stats['xla_flops'],
        'xla_bytes_accessed': stats['xla_bytes_accessed'],
        'xla_over_analytic': (stats['xla_flops'] / fl['train_per_step']) if stats['xla_flops'] else None,
        'xla_flops_note': (None if accum == 1 else f'XLA counts the body of the {accum}-micro-batch '
                           'accumulation loop once: xla_flops is about one micro-batch'),
        'achieved_flops_per_s': fl['train_per_step'] / med,
        'mfu_measured_peak': (fl['train_per_step'] / med / peak) if peak else None,
        'mfu_nominal_989': fl['train_per_step'] / med / NOMINAL_H100_SXM_BF16_DENSE,
        'compiled_memory': stats['memory'], 'compiled_needed_bytes': need,
        'device_memory_after': device_memory(), 'last_step_metrics': metrics,
    }
    for k in ('cost_error', 'memory_error'):
      if k in stats:
        out[k] = stats[k]
  except BaseException:
    # Keep a state that is still whole (not donated) for the next try.
    if _usable(holder['state']):
      pool['state'] = holder['state']
    raise
  pool['state'] = holder['state']
  return out


def train_section(args, vae_params, mesh, peak, results, save, pool) -> None:
  res = results['train']
  for mask in MASK_ORDER:
    if elapsed() > args.budget_s:
      res[mask] = {'skipped': f'time budget {args.budget_s}s spent ({elapsed():.0f}s)'}
      save()
      continue
    var_config, vae_config = configs(args.quick, mask)
    accum, tries = args.accum, []
    while True:
      log(f'train {mask}: batch {args.batch}, accum {accum}')
      try:
        r = train_once(var_config, vae_config, vae_params, mesh, args.batch, accum, args.steps, peak, pool)
        r['failed_tries'] = tries
        res[mask] = r
        log(f'train {mask}: {r["median_s"]:.4f} s/step, {r["images_per_s"]:.1f} img/s, '
            f'MFU {r["mfu_measured_peak"] or float("nan"):.3f} (measured peak), '
            f'{r["mfu_nominal_989"]:.3f} (989), loss {r["last_step_metrics"].get("loss"):.3f}')
        break
      except Exception as e:  # pylint: disable=broad-except
        tries.append({'accum_steps': accum, **error_info(e)})
        log(f'train {mask}: failed at accum {accum}: {str(e).splitlines()[0][:300]}')
        if is_oom(e) and args.batch % (accum * 2) == 0 and elapsed() < args.budget_s:
          accum *= 2
          continue
        res[mask] = {'error': tries[-1]['error'], 'failed_tries': tries}
        break
    save()


def sample_section(args, vae_params, mesh, results, save, pool) -> None:
  """The transformer weights: those the train section left (its last state's params), else one random
  initialisation shared by both masks (the parameters do not depend on the mask)."""
  res = results['sample']
  sc = SamplerConfig(cfg=1.5, top_k=900, top_p=0.96)
  res['sampler_config'] = dataclasses.asdict(sc)
  b = args.sample_batch
  decode = None
  for mask in MASK_ORDER:
    if elapsed() > args.budget_s:
      res[mask] = {'skipped': f'time budget {args.budget_s}s spent ({elapsed():.0f}s)'}
      save()
      continue
    try:
      var_config, vae_config = configs(args.quick, mask)
      log(f'sample {mask}: batch {b}')
      if pool.get('params') is None:
        state = pool.pop('state', None)
        if state is not None and _usable(state.params):
          pool['params'] = state.params  # The optimiser moments go with `state`.
        else:
          t = time.perf_counter()
          pool['params'] = jax.block_until_ready(random_var_params(var_config))
          log(f'  random transformer weights: {time.perf_counter() - t:.1f}s')
        del state
      params = pool['params']
      sampler = Sampler(var_config, vae_config, sc, mesh=mesh)
      labels = jnp.arange(b, dtype=jnp.int32) % var_config.num_classes
      t = time.perf_counter()
      tokens = jit_inference(sampler.tokens).lower(params, vae_params, labels, batch_rng(0, 0)).compile()
      tok_compile = time.perf_counter() - t
      tok_stats = compiled_stats(tokens)
      log(f'  tokens program compiled in {tok_compile:.1f}s; needs {gb(needed_bytes(tok_stats["memory"]))} GiB')
      if decode is None:
        f_shape = jax.ShapeDtypeStruct((b, vae_config.latent_side, vae_config.latent_side,
                                        vae_config.z_channels), jnp.float32)
        t = time.perf_counter()
        decode = jit_inference(sampler.decode).lower(vae_params, f_shape).compile()
        res['decode_compile_s'] = time.perf_counter() - t
        res['decode_compiled'] = compiled_stats(decode)
        log(f'  decode program compiled in {res["decode_compile_s"]:.1f}s; '
            f'needs {gb(needed_bytes(res["decode_compiled"]["memory"]))} GiB')
      tok_times, full_times = [], []
      images = ids = None
      for r in range(args.sample_repeats + 1):  # The first is the warm-up.
        t0 = time.perf_counter()
        ids, f_hat = tokens(params, vae_params, labels, batch_rng(0, r))
        jax.block_until_ready((ids, f_hat))
        t1 = time.perf_counter()
        images = decode(vae_params, f_hat)
        jax.block_until_ready(images)
        t2 = time.perf_counter()
        if r:
          tok_times.append(t1 - t0)
          full_times.append(t2 - t0)
      img = np.asarray(jax.device_get(images), np.float32)
      all_ids = np.concatenate([np.asarray(i) for i in ids], axis=1)
      full, tok = statistics.median(full_times), statistics.median(tok_times)
      res[mask] = {
          'batch': b, 'repeats': args.sample_repeats,
          'tokens_and_decode': {**summary(full_times), 'images_per_s': b / full},
          'tokens_only': {**summary(tok_times), 'images_per_s': b / tok},
          'decode_only_median_s': statistics.median([f - t for f, t in zip(full_times, tok_times)]),
          'tokens_compile_s': tok_compile, 'tokens_compiled': tok_stats,
          'tokens_needed_bytes': needed_bytes(tok_stats['memory']),
          'decode_needed_bytes': needed_bytes(res['decode_compiled']['memory']),
          'device_memory_after': device_memory(),
          'sanity': {'image_shape': list(img.shape), 'image_min': float(img.min()),
                     'image_max': float(img.max()), 'image_finite': bool(np.isfinite(img).all()),
                     'ids_min': int(all_ids.min()), 'ids_max': int(all_ids.max()),
                     'distinct_ids': int(np.unique(all_ids).size)},
      }
      log(f'sample {mask}: {b / full:.2f} img/s with decoding ({full:.3f} s/batch), '
          f'{b / tok:.2f} img/s tokens only ({tok:.3f} s/batch)')
      del params, sampler, tokens, ids, f_hat, images
    except Exception as e:  # pylint: disable=broad-except
      res[mask] = error_info(e)
      log(f'sample {mask}: failed: {str(e).splitlines()[0][:300]}')
    save()



def decode_default_section(args, vae_params, mesh, results, save) -> None:
  """The decoder at the tokenizer's precision='default' (bf16/tf32 convolutions on a GPU), for
  comparison with the sample rows (precision='highest', the library default); run last."""
  res = results['sample']
  b = args.sample_batch
  if elapsed() > args.budget_s:
    res['decode_precision_default'] = {'skipped': f'time budget {args.budget_s}s spent'}
    save()
    return
  try:
    var_config, vae_config = configs(args.quick, 'markov', precision='default')
    log('sample: decoder alone at precision=default')
    sampler = Sampler(var_config, vae_config, SamplerConfig(), mesh=mesh)
    f_hat = jax.random.normal(jax.random.PRNGKey(3), (b, vae_config.latent_side, vae_config.latent_side,
                                                      vae_config.z_channels), jnp.float32)
    t = time.perf_counter()
    dec = jit_inference(sampler.decode).lower(vae_params, f_hat).compile()
    compile_s = time.perf_counter() - t
    times = time_calls(lambda: dec(vae_params, f_hat), args.sample_repeats, warmup=1)
    res['decode_precision_default'] = {'batch': b, 'compile_s': compile_s, **summary(times),
                                       'images_per_s': b / statistics.median(times),
                                       'compiled': compiled_stats(dec)}
    log(f'  decode (precision=default): {statistics.median(times):.3f} s/batch')
  except Exception as e:  # pylint: disable=broad-except
    res['decode_precision_default'] = error_info(e)
  save()


def highest_matmul_precision():
  """A context with float32 matmuls at full precision (no TF32 on a GPU), if this JAX has it."""
  ctx = getattr(jax, 'default_matmul_precision', None)
  return ctx('highest') if ctx is not None else contextlib.nullcontext()


def _l2(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def attention_section(args, results, save) -> None:
  """Forward attention of d16's shapes: implementations against the project's float32 reference."""
  res = results['attention']
  c, _ = configs(args.quick, 'causal')
  b, length, h, d = (2 if args.quick else 4), c.seq_len, c.num_heads, c.head_dim
  on_gpu = jax.default_backend() == 'gpu'
  begin_ends = c.begin_ends
  dense = {'causal': attention.causal_mask(c.patch_nums), 'markov': attention.markov_mask(c.patch_nums)}
  res['shape'] = {'batch': b, 'seq_len': length, 'heads': h, 'head_dim': d, 'dtype': 'bfloat16'}
  if getattr(jax, 'default_matmul_precision', None) is None:
    res['precision_note'] = 'jax.default_matmul_precision missing: the reference ran at default precision'
  res['note'] = ('errors: max |out - ref| (max_abs), that over max |ref| (max_rel), ||out - ref|| / ||ref|| '
                 '(rel_l2); ref = the project attention in float32 at matmul precision highest on the same '
                 'bf16 inputs. Times: forward only, median of the repeats, each call blocked.')
  if not on_gpu:
    res['cudnn_note'] = f'skipped: backend is {jax.default_backend()}, cuDNN needs a GPU'
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(7), 3)
  raw = [jax.random.normal(k, (b, length, h, d), jnp.float32) for k in (k1, k2, k3)]
  # Inputs: 'normal' q, k, v ~ N(0, 1) with scale 1/sqrt(D); 'l2norm' like VAR's attn_l2_norm (unit q and
  # k, scale = its initial scale_mul 4, which the model folds into q; here both sides get scale=4).
  variants = {
      'normal': ([x.astype(jnp.bfloat16) for x in raw], 1.0 / math.sqrt(d)),
      'l2norm': ([_l2(raw[0]).astype(jnp.bfloat16), _l2(raw[1]).astype(jnp.bfloat16),
                  raw[2].astype(jnp.bfloat16)], 4.0),
  }
  res['variants'] = {'normal': 'q, k, v ~ N(0, 1), scale 1/sqrt(64)',
                     'l2norm': 'q, k unit vectors (attn_l2_norm), v ~ N(0, 1), scale 4.0 (initial scale_mul)'}
  reps = 3 if args.quick else 20
  res['repeats'] = reps

  def impls(mask, scale):
    m4 = jnp.asarray(dense[mask])[None, None]
    out = {}
    if mask == 'causal':
      out['project_bf16'] = lambda q, k, v: attention.dot_product_attention(
          q, k, v, scale, jnp.asarray(dense[mask]), jnp.bfloat16)
    else:
      out['project_bf16'] = lambda q, k, v: attention.markov_attention(q, k, v, scale, begin_ends,
                                                                        jnp.bfloat16)
    for name in (('cudnn', None, 'xla') if on_gpu else (None, 'xla')):
      out[f'jax_{name or "default"}'] = (lambda q, k, v, name=name: jax.nn.dot_product_attention(
          q, k, v, mask=m4, scale=scale, implementation=name))
    if mask == 'markov':  # One unmasked attention per scale, as the model's markov path.
      name = 'cudnn' if on_gpu else 'xla'
      out[f'jax_{name}_per_scale'] = lambda q, k, v, name=name: jnp.concatenate(
          [jax.nn.dot_product_attention(q[:, s:e], k[:, s:e], v[:, s:e], scale=scale, implementation=name)
           for s, e in begin_ends], axis=1)
    return out

  for mask in MASK_ORDER:
    if elapsed() > args.budget_s + ATTENTION_EXTRA_S:
      res[mask] = {'skipped': f'time budget {args.budget_s}s + {ATTENTION_EXTRA_S}s spent'}
      continue
    res[mask] = {'pairs_computed_dense': attention_pairs(c.patch_nums, 'dense'),
                 'pairs_kept': attention_pairs(c.patch_nums, mask)}
    for vname, ((q, k, v), scale) in variants.items():
      log(f'attention {mask} ({vname})')
      if mask == 'causal':
        ref_fn = lambda q, k, v, scale=scale: attention.dot_product_attention(
            q, k, v, scale, jnp.asarray(dense['causal']), jnp.float32)
      else:
        ref_fn = lambda q, k, v, scale=scale: attention.markov_attention(q, k, v, scale, begin_ends,
                                                                          jnp.float32)
      q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
      row = {}
      try:
        with highest_matmul_precision():
          ref_jit = jax.jit(ref_fn)
          ref = jax.block_until_ready(ref_jit(q32, k32, v32))
          if vname == 'normal':
            row['reference_f32'] = summary(time_calls(lambda: ref_jit(q32, k32, v32), reps, warmup=1))
        ref64 = np.asarray(ref, np.float64)
      except Exception as e:  # pylint: disable=broad-except
        res[mask][vname] = {'reference_error': error_info(e)}
        continue
      for name, fn in impls(mask, scale).items():
        try:
          f = jax.jit(fn)
          out = jax.block_until_ready(f(q, k, v))
          diff = np.asarray(out, np.float64) - ref64
          r = {'max_abs': float(np.abs(diff).max()),
               'max_rel': float(np.abs(diff).max() / np.abs(ref64).max()),
               'rel_l2': float(np.linalg.norm(diff) / np.linalg.norm(ref64)),
               'finite': bool(np.isfinite(np.asarray(out, np.float32)).all()),
               'out_dtype': str(out.dtype)}
          if vname == 'normal':
            r.update(summary(time_calls(lambda f=f: f(q, k, v), reps, warmup=1)))
          row[name] = r
        except Exception as e:  # pylint: disable=broad-except
          row[name] = error_info(e)
          log(f'  {name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}')
      res[mask][vname] = row
      save()


# --- the report ------------------------------------------------------------------------------------

def _fmt(x, spec='.3f'):
  if x is None:
    return '-'
  if isinstance(x, str):
    return x
  return format(x, spec)


def table(results) -> str:
  env = results.get('env', {})
  mm = results.get('matmul', {})
  lines = [f'Device: {env.get("device_kind")} ({env.get("backend")}), jax {env.get("jax")}, '
           f'jaxlib {env.get("jaxlib")}. Random weights. Config: {results["meta"]["model"]}.',
           f'Measured bf16 matmul peak: {_fmt((mm.get("peak_flops_per_s") or 0) / 1e12, ".1f")} TFLOP/s '
           f'(nominal H100 SXM dense bf16: 989 TFLOP/s).', '']
  tr, sa = results.get('train', {}), results.get('sample', {})

  def cell(sec, mask, get, spec='.3f'):
    r = sec.get(mask)
    if not isinstance(r, dict):
      return '-'
    if 'error' in r:
      return 'error'
    if 'skipped' in r:
      return 'skipped'
    try:
      return _fmt(get(r), spec)
    except (KeyError, TypeError, ZeroDivisionError):
      return '-'

  rows = [
      ('train: global batch (micro-batch x accum)', tr, lambda r: f'{r["global_batch"]} ({r["micro_batch"]} x '
       f'{r["accum_steps"]})', None),
      ('train: s/step (median)', tr, lambda r: r['median_s'], '.4f'),
      ('train: s/step (pipelined mean)', tr, lambda r: r['pipelined_mean_s'], '.4f'),
      ('train: images/s', tr, lambda r: r['images_per_s'], '.1f'),
      ('train: tokens/s', tr, lambda r: r['tokens_per_s'], ',.0f'),
      ('train: parameters (M)', tr, lambda r: r['params'] / 1e6, '.2f'),
      ('train: analytic TFLOP/step', tr, lambda r: r['analytic_flops']['train_per_step'] / 1e12, '.4g'),
      ('train: XLA cost_analysis TFLOP/step', tr, lambda r: f'{r["xla_flops"] / 1e12:.4g}' + (
          '' if r['accum_steps'] == 1 else ' (1 micro-batch)'), None),
      ('train: achieved TFLOP/s (analytic)', tr, lambda r: r['achieved_flops_per_s'] / 1e12, '.4g'),
      ('train: MFU vs measured matmul peak', tr, lambda r: r['mfu_measured_peak'], '.3f'),
      ('train: MFU vs 989 TFLOP/s', tr, lambda r: r['mfu_nominal_989'], '.3f'),
      ('train: compiled memory needed, GiB', tr, lambda r: gb(r['compiled_needed_bytes']), None),
      ('train: compiled temporaries, GiB', tr, lambda r: gb(r['compiled_memory']['temp_size_in_bytes']), None),
      ('train: compile s', tr, lambda r: r['compile_s'], '.1f'),
      ('train: loss at the last step (sanity; causal runs on)', tr, lambda r: r['last_step_metrics']['loss'], '.3f'),
      ('sample: images/s, tokens + decode', sa, lambda r: r['tokens_and_decode']['images_per_s'], '.2f'),
      ('sample: s/batch, tokens + decode', sa, lambda r: r['tokens_and_decode']['median_s'], '.3f'),
      ('sample: images/s, tokens only', sa, lambda r: r['tokens_only']['images_per_s'], '.2f'),
      ('sample: s/batch, tokens only', sa, lambda r: r['tokens_only']['median_s'], '.3f'),
      ('sample: tokens program memory, GiB', sa, lambda r: gb(r['tokens_needed_bytes']), None),
      ('sample: decode program memory, GiB', sa, lambda r: gb(r['decode_needed_bytes']), None),
      ('sample: tokens compile s', sa, lambda r: r['tokens_compile_s'], '.1f'),
  ]
  lines += ['| metric | causal | markov |', '|---|---|---|']
  for label, sec, get, spec in rows:
    if not any(isinstance(sec.get(m), dict) for m in ('causal', 'markov')):
      continue
    lines.append(f'| {label} | {cell(sec, "causal", get, spec)} | {cell(sec, "markov", get, spec)} |')
  dd = sa.get('decode_precision_default')
  if isinstance(dd, dict) and 'median_s' in dd:
    lines.append(f'\nDecoder alone at precision=default: {dd["median_s"]:.3f} s/batch of {dd["batch"]} '
                 f'({dd["images_per_s"]:.1f} img/s); the rows above decode at precision=highest.')
  at = results.get('attention', {})
  if at.get('causal') or at.get('markov'):
    s = at.get('shape', {})
    lines += ['', f'Attention, forward, batch {s.get("batch")} x L {s.get("seq_len")} x {s.get("heads")} heads '
              f'x {s.get("head_dim")}, bf16 inputs; error vs the project float32 attention '
              '(rel_l2 normal / l2norm inputs), time on normal inputs.', '',
              '| mask | implementation | rel_l2 (normal) | rel_l2 (l2norm) | max_abs (normal) | ms |',
              '|---|---|---|---|---|---|']
    for mask in ('causal', 'markov'):
      mres = at.get(mask) or {}
      names = []
      for vname in ('normal', 'l2norm'):
        for n in (mres.get(vname) or {}):
          if n not in names:
            names.append(n)
      for n in names:
        a = (mres.get('normal') or {}).get(n, {})
        l2 = (mres.get('l2norm') or {}).get(n, {})
        if 'error' in a:
          lines.append(f'| {mask} | {n} | error: {a["error"].splitlines()[0][:160]} | | | |')
          continue
        ms = _fmt(a.get('median_s') and a['median_s'] * 1e3, '.3f')
        lines.append(f'| {mask} | {n} | {_fmt(a.get("rel_l2"), ".2e")} | {_fmt(l2.get("rel_l2"), ".2e")} | '
                     f'{_fmt(a.get("max_abs"), ".2e")} | {ms} |')
    if at.get('cudnn_note'):
      lines.append(f'\ncuDNN: {at["cudnn_note"]}')
  errs = [f'{sec}.{k}' for sec in ('train', 'sample', 'attention')
          for k, v in (results.get(sec) or {}).items() if isinstance(v, dict) and 'error' in v]
  errs += [k for k in ('env', 'matmul', 'train', 'sample', 'attention')
           if isinstance(results.get(k), dict) and 'section_error' in results[k]]
  if errs:
    lines.append(f'\nErrors (text in the JSON): {", ".join(errs)}')
  lines.append(f'\nWall time: {results["meta"].get("wall_s", elapsed()):.1f} s')
  return '\n'.join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--out', required=True, help='JSON file to write')
  ap.add_argument('--quick', action='store_true', help='tiny sizes (depth 2, width 128, patch_nums '
                  '(1,2,3,4), tokenizer ch 32) for a CPU smoke test')
  ap.add_argument('--batch', type=int, default=None, help='train global batch (default 64, --quick 8)')
  ap.add_argument('--accum', type=int, default=1, help='first gradient-accumulation factor tried')
  ap.add_argument('--steps', type=int, default=None, help='timed train steps (default 10, --quick 3)')
  ap.add_argument('--sample_batch', type=int, default=None, help='default 32, --quick 4')
  ap.add_argument('--sample_repeats', type=int, default=None, help='default 3, --quick 2')
  ap.add_argument('--sections', default='train,sample,attention')
  ap.add_argument('--masks', default='markov,causal', help='masks to run, in this order')
  ap.add_argument('--budget_s', type=float, default=None,
                  help='start no new part after this many seconds (default 300; --quick: no limit)')
  args = ap.parse_args(argv)
  q = args.quick
  args.batch = args.batch or (8 if q else 64)
  args.steps = args.steps or (3 if q else 10)
  args.sample_batch = args.sample_batch or (4 if q else 32)
  args.sample_repeats = args.sample_repeats or (2 if q else 3)
  args.budget_s = args.budget_s if args.budget_s is not None else (1e9 if q else 300.0)
  global MASK_ORDER  # pylint: disable=global-statement
  MASK_ORDER = tuple(m.strip() for m in args.masks.split(',') if m.strip())
  sections = [s.strip() for s in args.sections.split(',') if s.strip()]
  unknown = set(sections) - {'train', 'sample', 'attention'}
  if unknown:
    ap.error(f'unknown sections {sorted(unknown)}')

  var_c, vae_c = configs(q, 'causal')
  results = {
      'meta': {'argv': sys.argv, 'args': vars(args), 'weights': 'random (no checkpoint)',
               'model': (f'{"quick" if q else "d16"}: depth {var_c.depth}, width {var_c.width}, '
                         f'{var_c.num_heads} heads, L {var_c.seq_len}, patch_nums {var_c.patch_nums}, '
                         f'compute bfloat16, params float32; tokenizer ch {vae_c.ch}, vocab '
                         f'{vae_c.vocab_size}, {vae_c.image_size} px'),
               'started': time.strftime('%Y-%m-%d %H:%M:%S')},
      'env': {}, 'matmul': {}, 'train': {}, 'sample': {}, 'attention': {},
  }

  def save():
    results['meta']['wall_s'] = elapsed()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(results, f, indent=1, default=str)
    os.replace(tmp, args.out)

  def guarded(name, fn):
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      results[name]['section_error'] = error_info(e)
      log(f'{name}: section failed: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}')
    save()

  log(f'gpu_timing: sections {sections}, quick={q}, out {args.out}')
  guarded('env', lambda: results['env'].update(environment()))
  log(f'device: {results["env"].get("device_kind")} ({results["env"].get("backend")}), '
      f'jax {results["env"].get("jax")}')
  guarded('matmul', lambda: results['matmul'].update(
      matmul_peak((256, 512) if q else (8192, 16384), 5 if q else 20)))
  peak = results['matmul'].get('peak_flops_per_s')
  mesh = make_mesh()
  vae_params, pool = None, {}
  if 'train' in sections or 'sample' in sections:
    log('tokenizer: random init')
    try:
      vae_params = jax.block_until_ready(random_vae_params(vae_c))
    except Exception as e:  # pylint: disable=broad-except
      results['meta']['tokenizer_init_error'] = error_info(e)
  if 'train' in sections:
    guarded('train', lambda: train_section(args, vae_params, mesh, peak, results, save, pool))
  if 'sample' in sections:
    guarded('sample', lambda: sample_section(args, vae_params, mesh, results, save, pool))
  if 'attention' in sections:
    guarded('attention', lambda: attention_section(args, results, save))
  if 'sample' in sections:
    guarded('sample', lambda: decode_default_section(args, vae_params, mesh, results, save))
  results['meta']['wall_s'] = elapsed()
  save()
  log(f'wrote {args.out}')
  print(table(results), flush=True)


if __name__ == '__main__':
  main()
