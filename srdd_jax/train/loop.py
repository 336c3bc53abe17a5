"""`--mode=train`: the transformer on tokens of the frozen tokenizer, sharded, checkpointed, logged.

Sections: mesh -> tokenizer -> data -> trainer (abstract state, shardings, jitted init) -> restore ->
step -> loop (log, checkpoint, SIGTERM). Every batch and every random draw is a function of the step,
so a run resumed from a checkpoint continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time

import jax
import numpy as np
from absl import logging

from srdd_jax.convert import params_io
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import multihost
from srdd_jax.tokenizer.api import Tokenizer, unbox
from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.train import recipe
from srdd_jax.train.checkpoint import Checkpointer
from srdd_jax.train.optimizer import OptimConfig
from srdd_jax.train.step import Trainer
from srdd_jax.transformer.config import VARConfig, preset


class TrainConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


class NonFiniteLoss(FloatingPointError):
  pass


def _tokenizer(config):
  tc = config.tokenizer
  if tc.checkpoint:
    if not os.path.isdir(tc.checkpoint):
      raise TrainConfigError(
          f'config.tokenizer.checkpoint={tc.checkpoint!r} does not exist; convert VAR\'s tokenizer with '
          f'`python -m srdd_jax.tools.convert_var --vae vae_ch160v4096z32.pth --out {tc.checkpoint}`')
    return params_io.load_vqvae(tc.checkpoint)
  if not tc.allow_random:
    raise TrainConfigError('config.tokenizer.checkpoint is empty: give a converted or trained tokenizer '
                           '(or set config.tokenizer.allow_random=True for a smoke run)')
  vq = VQVAEConfig(vocab_size=tc.vocab_size, z_channels=tc.z_channels, ch=tc.ch, ch_mult=tuple(tc.ch_mult),
                   patch_nums=tuple(config.model.patch_nums))
  logging.warning('config.tokenizer.checkpoint is empty: a freshly initialised (seed %d) tokenizer is '
                  'used, fine for smoke runs only', config.seed)
  return vq, unbox(Tokenizer(vq).init(jax.random.PRNGKey(config.seed + 1)))


def _var_config(config, vq: VQVAEConfig) -> VARConfig:
  m = config.model
  sizes = {k: int(v) for k, v in (('depth', m.depth), ('width', m.width), ('num_heads', m.heads)) if int(v)}
  common = dict(num_classes=m.num_classes, vocab_size=vq.vocab_size, z_channels=vq.z_channels,
                patch_nums=tuple(m.patch_nums), mask=m.mask, dtype=m.dtype, cond_drop_rate=m.cond_drop_rate,
                drop_path_rate=m.drop_path_rate)
  try:
    if m.preset:
      return preset(m.preset, **sizes, **common)
    if 'depth' not in sizes:
      raise ValueError('config.model.preset is empty, so config.model.depth must be > 0')
    return VARConfig(**sizes, **common)
  except ValueError as e:
    raise TrainConfigError(f'config.model: {e}') from e


def _validate(config, mesh, vq: VQVAEConfig):
  data_par = mesh.shape['data'] * mesh.shape['fsdp']
  gb = int(config.train.global_batch)
  if gb < 1 or gb % data_par:
    raise TrainConfigError(f'config.train.global_batch={gb} is not divisible by the data-parallel size '
                           f'{data_par} (mesh {dict(mesh.shape)})')
  if gb % (data_par * int(config.train.accum_steps)):
    raise TrainConfigError(f'config.train.global_batch={gb} must split into config.train.accum_steps='
                           f'{config.train.accum_steps} micro-batches divisible by {data_par}')
  if tuple(config.model.patch_nums)[-1] != vq.latent_side:
    raise TrainConfigError(f'config.model.patch_nums={tuple(config.model.patch_nums)} must end at the '
                           f'tokenizer latent side {vq.latent_side}')
  if int(config.train.steps) <= 0 and float(config.train.epochs) <= 0:
    raise TrainConfigError('config.train.steps and config.train.epochs are both 0: say how long to train')


def _data(config, image_size: int, vae_params=None, patch_nums=None):
  """The training examples: a token cache (config.data.token_cache) or an image source. Errors (missing
  path, empty data set, a cache of another tokenizer) name their config key."""
  from srdd_jax.data import pipeline, token_cache  # pylint: disable=import-outside-toplevel
  d = config.data.to_dict()
  cache = d.pop('token_cache', '')
  try:
    if cache:
      source = token_cache.TokenCache(cache, tokenizer_hash=token_cache.params_hash(vae_params),
                                      patch_nums=patch_nums)
    else:
      if d.get('source') == 'synthetic':
        d.setdefault('num_classes', int(config.model.num_classes))
      source = pipeline.build_source(d, image_size, train=True)
  except pipeline.DataError as e:
    raise TrainConfigError(str(e)) from e
  if source.num_classes > int(config.model.num_classes):
    raise TrainConfigError(f'config.model.num_classes={config.model.num_classes} but the data '
                           f'({source.description}) has {source.num_classes} classes')
  source.yields = 'ids' if cache else 'images'
  return source


def _rules(config):
  rules = tuple(tuple(r) for r in config.mesh_rules)
  if not rules:
    return pm.DEFAULT_RULES
  for r in rules:
    if len(r) != 2 or not isinstance(r[0], str):
      raise TrainConfigError(f'config.mesh_rules: {r!r} is not a (logical axis, mesh axes) pair')
  return rules


class _Grids:
  """Sample grids of the model being trained: PNG under DIR/samples/ and a TensorBoard image."""

  def __init__(self, config, var_config, vq, mesh, workdir):
    # pylint: disable=import-outside-toplevel
    from srdd_jax.diffusion.cli import ConfigError, sampler_config
    from srdd_jax.diffusion.sampler import Sampler
    from srdd_jax.parallel.compile import jit_inference
    try:
      self.sampler = Sampler(var_config, vq, sampler_config(config.sampler), mesh=mesh)
    except (ConfigError, ValueError) as e:
      raise TrainConfigError(f'config.sampler: {e}') from e
    nc = var_config.num_classes
    classes = [int(x) for x in str(config.sample.classes).split(',') if x.strip()] or list(range(min(nc, 10)))
    bad = [k for k in classes if not 0 <= k < nc]
    if bad:
      raise TrainConfigError(f'config.sample.classes: class {bad[0]} is out of range 0..{nc - 1}')
    self.per = max(int(config.sample.num_per_class), 1)
    labels = np.repeat(np.asarray(classes, np.int32), self.per)
    data_par = mesh.shape['data'] * mesh.shape['fsdp']
    self.n = len(labels)
    pad = -len(labels) % data_par  # Padded to split over the batch axes, trimmed after.
    self.labels = jax.device_put(np.concatenate([labels, np.repeat(labels[-1:], pad)]), pm.replicated(mesh))
    self.fn = jit_inference(self.sampler.sample)
    self.seed = int(config.seed)
    self.dir = os.path.join(workdir, 'samples')

  def write(self, step, var_params, vae_params, writer):
    from srdd_jax.diffusion.cli import grid, to_uint8  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel
    # The same key at every step, so grids of successive steps show the same noise evolving.
    _, images = self.fn(var_params, vae_params, self.labels, jax.random.PRNGKey(self.seed))
    images = to_uint8(multihost.gather(images))[:self.n]
    if not multihost.is_main_process():
      return None
    g = grid(images, self.per)
    os.makedirs(self.dir, exist_ok=True)
    path = os.path.join(self.dir, f'step_{step:08d}.png')
    Image.fromarray(g).save(path)
    writer.write_images(step, {'samples': g[None]})
    return path


def _export(workdir: str, step: int, state, var_config: VARConfig) -> str:
  """The trained transformer (EMA weights when kept) as a model directory that `--mode=sample`,
  `--mode=eval` and `params_io.load_var` read: WORKDIR/export/step_<n>, written once, never replaced."""
  out = os.path.join(workdir, 'export', f'step_{step:08d}')
  if os.path.exists(os.path.join(out, params_io.MODEL_JSON)):
    return out
  params = state.ema_params if state.ema_params is not None else state.params
  params_io.save_params(out, params, kind='var', config=var_config, source=f'{workdir} (train step {step})')
  logging.info('exported the trained transformer to %s', out)
  return out


def run_train(config, workdir: str, stop_after_steps: int | None = None, return_state: bool = False) -> dict:
  """Trains to config.train.steps (or stops after `stop_after_steps` steps of this call, saving)."""
  t_start = time.time()
  config = recipe.with_defaults(config)
  # --- mesh, tokenizer, validation ---
  try:
    mesh = pm.make_mesh(dict(config.mesh))
  except ValueError as e:
    raise TrainConfigError(f'config.mesh: {e}') from e
  vq, vae_params = _tokenizer(config)
  _validate(config, mesh, vq)
  # The scales are the model's choice; the tokenizer quantizes at whatever scales it is given.
  vq = dataclasses.replace(vq, patch_nums=tuple(config.model.patch_nums))
  var_config = _var_config(config, vq)
  # --- data ---
  data = _data(config, vq.image_size, vae_params, vq.patch_nums)
  t = config.train
  gb = int(t.global_batch)
  total = int(t.steps) if int(t.steps) > 0 else math.ceil(float(t.epochs) * data.num_examples / gb)
  o = config.optim
  warmup = int(o.warmup_steps) if int(o.warmup_steps) >= 0 else total // 50
  optim = OptimConfig(peak_lr=o.base_lr * gb / 256, weight_decay=o.weight_decay,
                      weight_decay_end=o.weight_decay_end, warmup_steps=warmup,
                      total_steps=total, final_fraction=o.final_fraction, clip_norm=o.clip_norm)
  progressive = None
  if int(t.progressive_start_scales) > 0:
    progressive = (int(t.progressive_start_scales), int(t.progressive_steps))
  # --- trainer, state, restore ---
  try:
    trainer = Trainer(var_config, vq, optim, mesh, rules=_rules(config), accum_steps=int(t.accum_steps),
                      ema_decay=float(t.ema_decay), seed=int(config.seed), progressive=progressive)
  except ValueError as e:
    raise TrainConfigError(f'config.train: {e}') from e
  grids = _Grids(config, var_config, vq, mesh, workdir) if int(t.sample_every) > 0 else None
  main_process = multihost.is_main_process()
  if main_process:
    logging.info('data: %s; %d steps of %d examples (%.2f epochs); model %s, %d scales, mask %s; mesh %s; '
                 '%d process(es)', data.description, total, gb, total * gb / data.num_examples,
                 config.model.preset or f'depth {var_config.depth}', var_config.num_scales, var_config.mask,
                 dict(mesh.shape), jax.process_count())
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=int(t.keep_checkpoints),
                      save_every=int(t.checkpoint_every))
  abstract, shardings = trainer.abstract_state()
  state, start = ckpt.restore_or_init(abstract, shardings, lambda: trainer.init(jax.random.PRNGKey(config.seed)))
  step_fn = trainer.make_step(vae_params)
  vae_replicated = jax.device_put(vae_params, pm.replicated(mesh))
  rows = trainer.local_rows(gb)
  batches = data.iterator(int(config.seed), start, gb, rows)
  # --- logging ---
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  writer = metric_writers.create_default_writer(workdir, just_logging=not main_process)
  stop = {'sigterm': False}
  previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
  tokens_per_step = gb * var_config.seq_len
  last_loss, step, t_log, n_log, export = None, start, time.time(), 0, None
  try:
    while step < total:
      x, labels = next(batches)
      batch = trainer.assemble_batch({'labels': labels, data.yields: x}, gb)
      state, metrics = step_fn(state, batch)
      step += 1
      n_log += 1
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not (math.isfinite(metrics['loss']) and math.isfinite(metrics['grad_norm'])):
        raise NonFiniteLoss(f'non-finite loss or gradient at step {step} (loss {metrics["loss"]}, grad '
                            f'norm {metrics["grad_norm"]}); the last checkpoint in {ckpt.directory} is kept')
      last_loss = metrics['loss']
      if step % int(t.log_every) == 0 or step == total:
        dt = time.time() - t_log
        rec = {'step': step, **metrics, 'steps_per_s': n_log / dt, 'tokens_per_s': n_log * tokens_per_step / dt,
               'examples_seen': step * gb, 'skipped_examples': data.skipped}
        if main_process:
          with open(metrics_path, 'a') as f:
            f.write(json.dumps(rec) + '\n')
          writer.write_scalars(step, {k: v for k, v in rec.items() if k != 'step'})
          eta = (total - step) / max(rec['steps_per_s'], 1e-9)
          logging.info('step %d/%d loss %.4f acc %.3f lr %.2e %.2f steps/s ETA %.0fs', step, total,
                       rec['loss'], rec['accuracy'], rec['lr'], rec['steps_per_s'], eta)
        t_log, n_log = time.time(), 0
      if grids is not None and (step % int(t.sample_every) == 0 or step == total):
        path = grids.write(step, state.ema_params if state.ema_params is not None else state.params,
                           vae_replicated, writer)
        if path:
          logging.info('sample grid: %s', path)
      ckpt.save(step, state, {'step': step})
      if stop['sigterm'] or (stop_after_steps is not None and step - start >= stop_after_steps):
        ckpt.save(step, state, {'step': step}, force=True)
        logging.info('stopping at step %d (%s); checkpoint saved', step,
                     'SIGTERM' if stop['sigterm'] else 'requested')
        break
    if step == total:
      ckpt.save(step, state, {'step': step}, force=True)
      export = _export(workdir, step, state, var_config)
  finally:
    ckpt.close()
    signal.signal(signal.SIGTERM, previous)
    writer.flush()
  summary = {'start_step': start, 'end_step': step, 'last_loss': last_loss,
             'seconds': round(time.time() - t_start, 2), 'workdir': workdir, 'export': export}
  if return_state:
    summary['state'] = state
  return summary
