"""The JAX worker of the GPU suite (srdd_jax/bench/suite.py): one depth of our side in a process of its
own, started by the suite as `python -m srdd_jax.bench.suite_worker --jax-worker SPEC.json`. It finds
the batches (VAR-PyTorch's, or the largest that XLA's memory analysis of a probe batch says fits),
compiles every program at once in threads, and times them with the bench's train-step and sampler
timing (srdd_jax/bench/timing.py). Protocol: one JSON object per line on standard output ({"type":
"info" | "matmul_peak" | "batch" | "compile" | "record" | "skipped", ...}); logs go to standard error.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from srdd_jax import files
from srdd_jax.bench import timing
from srdd_jax.bench.base import (DECODE_PRECISION, RECORD_FIELDS, SAMPLER, error_info, log, model_config,
                                 tokenizer_config)
from srdd_jax.diffusion.sampler import Sampler, batch_rng
from srdd_jax.parallel import compile as pc
from srdd_jax.parallel import mesh as pm
from srdd_jax.tokenizer.api import Tokenizer, unbox
from srdd_jax.train.optimizer import OptimConfig
from srdd_jax.train.step import Trainer
from srdd_jax.transformer.attention import resolve_impl
from srdd_jax.transformer.config import VARConfig
from srdd_jax.transformer.model import VAR

FIT_FRACTION = 0.95  # Of the JAX pool (bytes_limit): XLA's analysis leaves out the runtime's own buffers.
# Where ours finds its own largest batch: the batch whose compiled memory is extrapolated (linear in the
# batch) to the ladder, instead of compiling at the ladder's top first.
PROBE_BATCH = {'train': 32, 'sample': 16}


def _sds(tree, sharding):
  return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def lower_train(c: VARConfig, vae_c, mesh, batch: int):
  """`jit_train_step` lowered on abstract state, tokenizer and batch in the shardings that
  `timing.bench_train` places the real ones in, so its executable takes them."""
  trainer = Trainer(c, vae_c, OptimConfig(peak_lr=1e-4, total_steps=1000), mesh)
  state, shardings = trainer.abstract_state()
  abstract_state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                          state, shardings)
  vae = _sds(unbox(Tokenizer(vae_c).abstract_params()), pm.replicated(mesh))
  data = {'labels': jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=trainer.batch_sharding),
          'ids': jax.ShapeDtypeStruct((batch, c.seq_len), jnp.int32, sharding=trainer.batch_sharding)}
  return pc.jit_train_step(trainer).lower(abstract_state, vae, data)


def abstract_var_params(c: VARConfig):
  x = jnp.zeros((1, c.seq_len - 1, c.z_channels), jnp.float32)
  return unbox(jax.eval_shape(lambda: VAR(c).init(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32), x)['params']))


def lower_tokens(c: VARConfig, vae_c, vae_params, mesh, batch: int):
  """The sampler's tokens program as `timing.bench_sample` lowers it (parameters abstract, replicated)."""
  sampler = Sampler(c, vae_c, SAMPLER, mesh=mesh, decode_precision=DECODE_PRECISION)
  params = _sds(abstract_var_params(c), pm.replicated(mesh))
  labels = jnp.arange(batch, dtype=jnp.int32) % c.num_classes
  return pc.jit_inference(sampler.tokens).lower(params, vae_params, labels, batch_rng(0, 0))


def compile_decoder(c: VARConfig, vae_c, vae_params, mesh, batch: int, f_sharding) -> dict:
  sampler = Sampler(c, vae_c, SAMPLER, mesh=mesh, decode_precision=DECODE_PRECISION)
  f_shape = jax.ShapeDtypeStruct((batch, vae_c.latent_side, vae_c.latent_side, vae_c.z_channels), jnp.float32,
                                 sharding=f_sharding)
  t = time.perf_counter()
  dec = pc.jit_inference(sampler.decode).lower(vae_params, f_shape).compile()
  return {'compiled': dec, 'compile_s': time.perf_counter() - t, 'stats': pc.compiled_stats(dec), 'warm': False}


def is_oom(e: BaseException) -> bool:
  s = str(e)
  return 'RESOURCE_EXHAUSTED' in s or 'Out of memory' in s or 'out of memory' in s


def jax_worker(path: str) -> int:
  proto = sys.stdout
  sys.stdout = sys.stderr

  def emit(obj):
    proto.write(json.dumps(obj, default=str) + '\n')
    proto.flush()

  spec = files.read_json(path)
  env = timing.environment()
  emit({'type': 'info', 'info': env})
  accel = env['backend'] != 'cpu'
  dtype, depth, masks = spec['dtype'], spec['depth'], spec['masks']
  peak = spec.get('peak')
  if spec.get('measure_peak'):
    mp = timing.matmul_peak((4096, 8192) if accel else (512, 1024), 10 if accel else 3, dtype)
    emit({'type': 'matmul_peak', 'matmul_peak': mp})
    peak = mp['peak_flops_per_s']
  model = dict(scan_blocks=bool(accel if spec.get('scan') is None else spec['scan']), remat=spec['remat'],
               attention=spec['attention'])
  cs = {m: model_config(depth, m, dtype, spec['width'], spec['heads'], spec['patch_nums'], **model)
        for m in masks}
  c0 = cs[masks[0]]
  vae_c = tokenizer_config(c0, spec['tokenizer_ch'])
  vae_params = timing.random_vae_params(vae_c)
  mesh = pm.make_mesh()
  limit = spec.get('memory_limit') or (env.get('device_memory') or {}).get('bytes_limit')
  deadline = spec.get('deadline')
  # A batch is split over the data and fsdp axes: a ladder step they do not divide cannot run (the
  # suite's test on 8 CPU devices stepped sampling down to 4).
  rows = mesh.shape['data'] * mesh.shape['fsdp']
  kinds = {kind: {**k, 'ladder': [b for b in k['ladder'] if b % rows == 0] or [rows]}
           for kind, k in spec['kinds'].items()}
  # Enough threads for every program at once (a decoder's task waits for its tokens program).
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=16)
  pending = []  # Every compile started, used or not.

  def timed_compile(lowered):
    t = time.perf_counter()
    exe = lowered.compile()
    return exe, time.perf_counter() - t

  def compile_kind(kind: str, batch: int) -> dict:
    """Lowers here (tracing holds the GIL) and compiles in threads: {mask: future}, and for sampling
    'decoder': the future of the decoder (it takes f_hat in the sharding the tokens program leaves)."""
    futs = {}
    pending.append(futs)
    for m in masks:
      low = (lower_train(cs[m], vae_c, mesh, batch) if kind == 'train' else
             lower_tokens(cs[m], vae_c, vae_params, mesh, batch))
      futs[m] = pool.submit(timed_compile, low)
    if kind == 'sample':
      first = futs[masks[0]]
      futs['decoder'] = pool.submit(
          lambda: compile_decoder(c0, vae_c, vae_params, mesh, batch, first.result()[0].output_shardings[1]))
    return futs

  def gather(kind: str, batch: int, futs: dict) -> dict:
    """{'programs': {mask: (exe, secs, stats)}, 'decoder' (sampling), 'need': bytes the kind needs at
    once, 'arg': its programs' argument bytes, 'batch'}."""
    got = {m: futs[m].result() for m in masks}
    got = {m: (exe, secs, pc.compiled_stats(exe)) for m, (exe, secs) in got.items()}
    need = max(pc.needed_bytes(st['memory']) or 0 for _, _, st in got.values())
    arg = max((st['memory'] or {}).get('argument_size_in_bytes', 0) for _, _, st in got.values())
    out = {'programs': got, 'need': need, 'arg': arg, 'batch': batch}
    if kind == 'sample':
      out['decoder'] = futs['decoder'].result()
      # The decoder runs while the transformer's parameters (the tokens program's arguments) stay.
      out['need'] = max(need, (pc.needed_bytes(out['decoder']['stats']['memory']) or 0) + arg)
    return out

  def fits(got: dict) -> bool:
    return limit is None or got['need'] <= FIT_FRACTION * limit

  def smaller(kind: str, got: dict) -> int | None:
    """The largest ladder batch below got's that XLA's numbers (linear in the batch) say fits."""
    per = max((got['need'] - got['arg']) / got['batch'], 1.0)
    room = FIT_FRACTION * limit - got['arg']
    fit = [b for b in kinds[kind]['ladder'] if b < got['batch'] and b * per <= room]
    return max(fit) if fit else None

  def reduced(kind: str, new, old: int, why: str):
    emit({'type': 'batch', 'kind': kind, 'depth': depth, 'batch': new, 'reduced_from': old, 'how': why})

  # The batch of each kind: VAR-PyTorch's; else, where the memory limit is known, the largest of the
  # ladder that XLA's memory analysis of a small probe batch (PROBE_BATCH), linear in the batch, says
  # fits; else the ladder's top under the cap. (A program compiled at a batch far over the memory costs
  # minutes of XLA's rematerialisation before it fails: the first GPU run lost its d24 programs so.)
  plan, how = {}, {}  # kind -> batch, and why
  probes, ready = {}, {}
  for kind, k in kinds.items():
    under = [b for b in k['ladder'] if b <= k['cap']]
    top = max(under) if under else min(k['ladder'])
    if k.get('batch'):
      plan[kind], how[kind] = int(k['batch']), 'VAR-PyTorch\'s batch'
      continue
    plan[kind], how[kind] = top, 'the ladder\'s top under the cap'
    small = [b for b in under if b <= PROBE_BATCH[kind]]
    if limit is not None and small and max(small) < top:
      probes[kind] = (max(small), compile_kind(kind, max(small)))
  for kind, (probe, futs) in probes.items():
    try:
      got = gather(kind, probe, futs)
    except Exception as e:  # pylint: disable=broad-except
      how[kind] += f' (the probe at batch {probe} failed: {type(e).__name__})'
      continue
    per = max((got['need'] - got['arg']) / probe, 1.0)
    room = FIT_FRACTION * limit - got['arg']
    fit = [b for b in kinds[kind]['ladder'] if probe <= b <= plan[kind] and b * per <= room]
    plan[kind] = max(fit) if fit else probe
    if plan[kind] == probe:
      ready[kind] = futs  # Compiled already.
    how[kind] = (f"the largest under the cap that fits by XLA's memory analysis at batch {probe} "
                 f'({per / 2**20:,.1f} MiB per example, {got["arg"] / 2**20:,.0f} MiB of arguments)')
  for kind in kinds:
    emit({'type': 'batch', 'kind': kind, 'depth': depth, 'batch': plan[kind], 'reduced_from': None,
          'how': how[kind]})

  # Everything compiles at once, the random weights are drawn on the host meanwhile. Where a memory
  # limit is known each kind is also compiled at a smaller batch (sampling: half; train: the ladder's
  # next): where ours needs more memory than VAR-PyTorch (our causal sampler's KV cache, say) the
  # fallback is then ready, and a compile in parallel costs little wall time.
  t0 = time.perf_counter()
  futures = {kind: ready.get(kind) or compile_kind(kind, plan[kind]) for kind in kinds}
  spare = {}
  if limit is not None:
    for kind in kinds:
      lower = [b for b in kinds[kind]['ladder'] if b <= (plan[kind] // 2 if kind == 'sample' else plan[kind] - 1)]
      if lower:
        spare[kind] = (max(lower), compile_kind(kind, max(lower)))
  host_params = timing.random_var_params(c0)
  compiled = {}
  for kind in kinds:
    try:
      got = gather(kind, plan[kind], futures[kind])
      for _ in range(3):
        if fits(got):
          break
        why = (f"XLA's memory analysis: {got['need'] / 2**20:,.0f} MiB at batch {got['batch']} > "
               f'{FIT_FRACTION:.0%} of the {limit / 2**20:,.0f} MiB limit')
        if kind in spare:
          half, futs = spare.pop(kind)
          alt = gather(kind, half, futs)
          if fits(alt) or smaller(kind, alt) is None:
            reduced(kind, half, got['batch'], why + ' (compiled at both)')
            plan[kind], got = half, alt
            continue
          got = alt
        new = smaller(kind, got)
        reduced(kind, new, plan[kind], why)
        if new is None:
          raise MemoryError(f'no batch of {kinds[kind]["ladder"]} fits in {FIT_FRACTION:.0%} of {limit} bytes '
                            f'({got["need"]} bytes at batch {got["batch"]})')
        plan[kind] = new
        got = gather(kind, new, compile_kind(kind, new))
      compiled[kind] = got
    except Exception as e:  # pylint: disable=broad-except
      compiled[kind] = {'error': e}
  # A spare compile nobody needs may still run: on a GPU it autotunes kernels, which would disturb the
  # timings; it started with the others, so waiting for it costs little.
  concurrent.futures.wait([f for futs in pending for f in futs.values()])
  del spare, futures, pending[:]
  emit({'type': 'compile', 'depth': depth, 'wall_s': time.perf_counter() - t0,
        'programs': {f'{kind} {m} b{got["batch"]}': round(got['programs'][m][1], 2)
                     for kind, got in compiled.items() if 'programs' in got for m in masks} |
                    {f'decode b{got["batch"]}': round(got['decoder']['compile_s'], 2)
                     for got in compiled.values() if 'decoder' in got},
        'needed_bytes': {kind: got.get('need') for kind, got in compiled.items()},
        'memory_limit_bytes': limit})

  decoders = {}
  for kind in kinds:
    got = compiled[kind]
    for attempt in range(2):
      redo = False
      for m in masks:
        c, batch = cs[m], plan[kind]
        base = {**{f: None for f in RECORD_FIELDS}, 'kind': kind, 'mode': m, 'depth': depth,
                'width': c.width, 'heads': c.num_heads, 'seq_len': c.seq_len, 'batch': batch, 'dtype': dtype}
        if 'error' in got:
          emit({'type': 'record', 'record': {**base, **error_info(got['error'])}})
          continue
        if deadline is not None and time.time() > deadline:
          emit({'type': 'skipped', 'kind': kind, 'mode': m, 'depth': depth, 'batch': batch,
                'reason': 'time budget spent'})
          continue
        exe, secs, _ = got['programs'][m]
        log(f'{kind} {m} depth {depth} batch {batch}')
        try:
          if kind == 'train':
            rec = timing.bench_train(c, vae_c, vae_params, host_params, mesh, batch, spec['repeats'],
                                     spec['warmup'], peak, compiled=(exe, secs))
          else:
            key = (batch, exe.output_shardings[1])
            decoders.setdefault(key, got['decoder'])
            rec = timing.bench_sample(c, vae_c, vae_params, host_params, mesh, batch, spec['repeats'],
                                      spec['warmup'], decoders, tokens=(exe, secs))
        except Exception as e:  # pylint: disable=broad-except
          if is_oom(e) and attempt == 0:
            new = max([b for b in kinds[kind]['ladder'] if b < batch], default=None)
            if new is not None:
              emit({'type': 'batch', 'kind': kind, 'depth': depth, 'batch': new, 'reduced_from': batch,
                    'how': f'out of memory at batch {batch} when run: {str(e).splitlines()[0][:200]}'})
              plan[kind] = new
              got = compiled[kind] = gather(kind, new, compile_kind(kind, new))
              redo = True
              break
          rec = {**base, **error_info(e)}
          log(f'  failed: {rec["error"].splitlines()[0][:300]}')
        else:
          log(f'  {rec["seconds"]:.4f} s')
        rec.update(attention_impl=resolve_impl(c.attention, c.dtype), remat=c.remat, scan_blocks=c.scan_blocks,
                   memory_limit_bytes=limit)
        emit({'type': 'record', 'record': rec})
      if not redo:
        break
  pool.shutdown(wait=False, cancel_futures=True)
  sys.stderr.flush()
  proto.flush()
  os._exit(0)  # Without waiting for compiles nobody needs any more (a spare batch's).


if __name__ == '__main__':
  ap = argparse.ArgumentParser(description='the JAX worker of the suite (started by srdd_jax.bench)')
  ap.add_argument('--jax-worker', dest='jax_worker', required=True, metavar='SPEC.json')
  sys.exit(jax_worker(ap.parse_args().jax_worker))
