"""`--mode=train`: the transformer on tokens of the frozen tokenizer, sharded, checkpointed, logged.

Pieces: mesh -> tokenizer (config.tokenizer.checkpoint) -> data (a token cache or images encoded in the
step) -> Trainer (train/step.py) -> the shared driver (train/driver.py), with sample grids as the
evaluation and WORKDIR/export/step_<n> as the export.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from srdd_jax.config import ConfigError, ints, with_defaults
from srdd_jax.convert.loading import init_params_from, tokenizer_for_model
from srdd_jax.data import pipeline, token_cache
from srdd_jax.data.images import grid, to_uint8
from srdd_jax.diffusion.generate import sampler_config
from srdd_jax.diffusion.sampler import Sampler
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import multihost
from srdd_jax.parallel.compile import (compiled_stats, jit_inference, measured_matmul_peak, needed_bytes,
                                       nominal_peak_flops)
from srdd_jax.train import driver
from srdd_jax.train.distill import heldout_token_loss
from srdd_jax.train.export import export_transformer
from srdd_jax.train.optimizer import OptimConfig, peak_lr_for
from srdd_jax.train.progressive import Progressive
from srdd_jax.train.refine import RefineTrainer
from srdd_jax.train.step import Trainer
from srdd_jax.transformer.config import var_config as build_var_config
from srdd_jax.transformer.flops import train_step_flops


def _check_ranges(config):
  """Values that cannot work whatever the data and the mesh; checked before anything is loaded."""
  t, o = config.train, config.optim
  for key in ('global_batch', 'accum_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
    if int(t[key]) < 1:
      raise ConfigError(f'config.train.{key}={t[key]}: must be >= 1')
  for key in ('steps', 'epochs', 'sample_every', 'progressive_start_scales', 'progressive_steps',
              'heldout_every', 'heldout_examples'):
    if float(t[key]) < 0:
      raise ConfigError(f'config.train.{key}={t[key]}: must be >= 0')
  if not 0 <= float(t.refine_zero_prob) <= 1:
    raise ConfigError(f'config.train.refine_zero_prob={t.refine_zero_prob}: must be in [0, 1]')
  if not 0 < float(t.refine_max_ratio) <= 1:
    raise ConfigError(f'config.train.refine_max_ratio={t.refine_max_ratio}: must be in (0, 1]')
  if t.init_from and not os.path.isdir(t.init_from):
    raise ConfigError(f'config.train.init_from={t.init_from!r} does not exist: give a transformer '
                      'directory (WORKDIR/export/step_<n> of a training run, or convert_var output)')
  if not 0 <= float(t.ema_decay) < 1:
    raise ConfigError(f'config.train.ema_decay={t.ema_decay}: must be in [0, 1) (0 = no EMA)')
  if not float(o.base_lr) > 0:
    raise ConfigError(f'config.optim.base_lr={o.base_lr}: must be > 0')
  if not 0 <= float(o.final_fraction) <= 1:
    raise ConfigError(f'config.optim.final_fraction={o.final_fraction}: must be in [0, 1]')


def _validate(config, mesh):
  data_par = pm.data_parallel_size(mesh)
  gb = int(config.train.global_batch)
  if gb % data_par:
    raise ConfigError(f'config.train.global_batch={gb} is not divisible by the data-parallel size '
                      f'{data_par} (mesh {dict(mesh.shape)})')
  if gb % (data_par * int(config.train.accum_steps)):
    raise ConfigError(f'config.train.global_batch={gb} must split into config.train.accum_steps='
                      f'{config.train.accum_steps} micro-batches divisible by {data_par}')
  if int(config.train.steps) <= 0 and float(config.train.epochs) <= 0:
    raise ConfigError('config.train.steps and config.train.epochs are both 0: say how long to train')


def training_data(config, tok):
  """The training examples: a token cache (config.data.token_cache) or an image source; `yields` says
  which ('ids' or 'images'). `tok` is the LoadedTokenizer a cache must have been written by."""
  d = config.data.to_dict()
  cache = d.pop('token_cache', '')
  image_size = tok.config.image_size
  if cache:
    source = token_cache.TokenCache(cache, tokenizer_hash=lambda: token_cache.params_hash(tok.params),
                                    patch_nums=tok.config.patch_nums)
  else:
    if d.get('source') == 'synthetic' and d.get('num_classes') is None:
      d['num_classes'] = int(config.model.num_classes)
    source = pipeline.build_source(d, image_size, train=True)
  if source.num_classes > int(config.model.num_classes):
    raise ConfigError(f'config.model.num_classes={config.model.num_classes} but the data '
                      f'({source.description}) has {source.num_classes} classes')
  source.yields = 'ids' if cache else 'images'
  return source


def init_from_checkpoint(trainer: Trainer, directory: str, seed: int):
  """The state `trainer.init` gives, its weights replaced by those of the transformer directory
  `directory` (config.train.init_from; the refine stream added at its initial values if missing) and its
  optimiser fresh: a fine-tune starts at step 0."""
  state = trainer.init(jax.random.PRNGKey(seed))
  abstract, shardings = trainer.abstract_state()
  params = init_params_from(directory, trainer.var_config, abstract.params, jax.random.PRNGKey(seed + 1))
  if multihost.is_main_process():
    logging.info('initialised from %s', directory)
  # Copies made on the devices, one per use: the step donates the state, and a buffer shared by the
  # weights and their EMA (or with the host arrays just loaded) cannot be donated.
  host = jax.device_get(params)
  place = lambda s: jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p), out_shardings=s)(
      jax.device_put(host, s))
  ema = None if state.ema_params is None else place(shardings.ema_params)
  return state.replace(params=place(shardings.params), ema_params=ema)


class SampleGrids:
  """Sample grids of the model being trained: PNG under DIR/samples/ and a TensorBoard image."""

  def __init__(self, config, var_config, vq, mesh, workdir):
    try:
      self.sampler = Sampler(var_config, vq, sampler_config(config.sampler, var_config.mask), mesh=mesh)
    except ValueError as e:
      raise ConfigError(f'config.sampler: {e}') from e
    nc = var_config.num_classes
    classes = list(ints(config.sample.classes, 'config.sample.classes')) or list(range(min(nc, 10)))
    bad = [k for k in classes if not 0 <= k < nc]
    if bad:
      raise ConfigError(f'config.sample.classes: class {bad[0]} is out of range 0..{nc - 1}')
    self.per = max(int(config.sample.num_per_class), 1)
    labels = np.repeat(np.asarray(classes, np.int32), self.per)
    self.n = len(labels)
    pad = -len(labels) % pm.data_parallel_size(mesh)  # Padded to split over the batch axes, trimmed after.
    self.labels = jax.device_put(np.concatenate([labels, np.repeat(labels[-1:], pad)]), pm.replicated(mesh))
    self.fn = jit_inference(self.sampler.sample)
    self.seed = int(config.seed)
    self.dir = os.path.join(workdir, 'samples')

  def write(self, step, var_params, vae_params, writer):
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


class TransformerTask(driver.Task):
  """The transformer's state, step, sample grids and export, for the shared driver."""

  name = 'train'

  def __init__(self, config, workdir: str):
    _check_ranges(config)
    mesh = pm.mesh_from_config(config)
    _validate(config, mesh)
    tok = tokenizer_for_model(config)
    self.vq = vq = tok.config
    self.var_config = var_config = self.model_config(config, vq)
    self.data = training_data(config, tok)
    self.vae_params = tok.params  # A fresh tokenizer is initialised here, once the config is known to work.
    t, o = config.train, config.optim
    gb = self.global_batch = int(t.global_batch)
    total = self.total_steps = (int(t.steps) if int(t.steps) > 0
                                else math.ceil(float(t.epochs) * self.data.num_examples / gb))
    warmup = int(o.warmup_steps) if int(o.warmup_steps) >= 0 else total // 50
    optim = OptimConfig(peak_lr=peak_lr_for(gb, o.base_lr), weight_decay=o.weight_decay,
                        weight_decay_end=o.weight_decay_end, warmup_steps=warmup, total_steps=total,
                        final_fraction=o.final_fraction, clip_norm=o.clip_norm)
    progressive = None
    try:
      if int(t.progressive_start_scales) > 0:
        ramp = int(t.progressive_warmup_steps)
        # VAR's default ramp: pgwp = epochs / 300, i.e. a 300th of training.
        progressive = Progressive(int(t.progressive_start_scales), int(t.progressive_steps), warmup,
                                  ramp if ramp > 0 else max(total // 300, 1), var_config.num_scales)
    except ValueError as e:
      raise ConfigError(f'config.train.progressive_start_scales/progressive_steps/progressive_warmup_steps '
                        f'(with the learning-rate warm-up of {warmup} steps): {e}') from e
    # With the refine stream, the trainer that reveals part of each scale (train/refine.py).
    trainer, extra = Trainer, {}
    if var_config.refine:
      trainer, extra = RefineTrainer, dict(zero_prob=float(t.refine_zero_prob),
                                           max_ratio=float(t.refine_max_ratio))
    try:
      self.trainer = self.make_trainer(trainer, var_config, vq, optim, mesh,
                                       rules=pm.rules_from_config(config), accum_steps=int(t.accum_steps),
                                       ema_decay=float(t.ema_decay), seed=int(config.seed),
                                       progressive=progressive, **extra)
    except ValueError as e:
      raise ConfigError(f'config.train: {e}') from e
    self.grids = SampleGrids(config, var_config, vq, mesh, workdir) if int(t.sample_every) > 0 else None
    self.sample_every = int(t.sample_every)
    self.heldout = None
    if t.heldout_cache:  # Read now: a wrong cache fails before any step, not at the end.
      cache = token_cache.TokenCache(t.heldout_cache, tokenizer_hash=lambda: token_cache.params_hash(tok.params),
                                     patch_nums=var_config.patch_nums, key='config.train.heldout_cache')
      n = int(t.heldout_examples) or len(cache.ids)
      self.heldout = (cache.ids[:n, 0], cache.labels[:n], int(t.heldout_every) or total)
    # The driver's one evaluation hook serves both: every step either of them is due (and the last).
    self.eval_every = math.gcd(self.sample_every, self.heldout[2] if self.heldout else 0)
    self.root = self.workdir = workdir
    self.log_every, self.checkpoint_every, self.keep_checkpoints = (int(t.log_every), int(t.checkpoint_every),
                                                                    int(t.keep_checkpoints))
    self.seed = int(config.seed)
    self.init_from = t.init_from
    if multihost.is_main_process():
      logging.info('data: %s; %d steps of %d examples (%.2f epochs); model %s, %d scales, mask %s; mesh %s; '
                   '%d process(es)', self.data.description, total, gb, total * gb / self.data.num_examples,
                   config.model.preset or f'depth {var_config.depth}', var_config.num_scales, var_config.mask,
                   dict(mesh.shape), jax.process_count())

  def model_config(self, config, vq):
    """The transformer to train (a subclass may take it from elsewhere, e.g. a teacher's)."""
    return build_var_config(config, vq.vocab_size, vq.z_channels)

  def make_trainer(self, cls, *args, **kwargs) -> Trainer:
    """The trainer: `cls` (Trainer, or RefineTrainer with the refine stream) unless a subclass says."""
    return cls(*args, **kwargs)

  def abstract_state(self):
    return self.trainer.abstract_state()

  def init(self):
    """A fresh state, or with config.train.init_from its weights (the driver calls this only when the
    run has no checkpoint of its own, so an interrupted fine-tune resumes instead of restarting)."""
    if self.init_from:
      return init_from_checkpoint(self.trainer, self.init_from, self.seed)
    return self.trainer.init(jax.random.PRNGKey(self.seed))

  def begin(self, start_step):
    # One program per progressive stage (the sequence length differs), compiled when first needed.
    self.compiled, self.flops_of = {}, {}
    self.host_step = start_step
    self.vae_replicated = jax.device_put(self.vae_params, pm.replicated(self.trainer.mesh))
    self.batches = self.data.iterator(self.seed, start_step, self.global_batch,
                                      self.trainer.local_rows(self.global_batch))

  def step(self, state):
    x, labels = next(self.batches)
    batch = self.trainer.assemble_batch({'labels': labels, self.data.yields: x}, self.global_batch)
    stage = self.trainer.stage(self.host_step)
    if stage not in self.compiled:
      self.compiled[stage] = self._compile(state, batch, stage)
    self.step_flops = self.flops_of[stage]
    self.host_step += 1
    return self.compiled[stage](state, batch)

  def _compile(self, state, batch, stage):
    """Compiles the step of `stage` ahead of its first call and logs what it costs: per-device memory
    from XLA, the step's useful FLOPs and the peak that MFU is measured against."""
    t = time.perf_counter()
    compiled = self.trainer.make_step(self.vae_params, stage).lower(state, batch).compile()
    stats = compiled_stats(compiled)
    c = self.var_config
    if stage is not None:  # The scales this stage computes.
      c = dataclasses.replace(c, patch_nums=c.patch_nums[:stage[0]])
      logging.info('progressive stage: %d of %d scales (%d tokens)%s', stage[0], self.var_config.num_scales,
                   c.seq_len, f', newest scale weight ramped over {stage[2]} steps' if stage[2] else '')
    self.flops_of[stage] = train_step_flops(c, self.global_batch)
    self.step_flops = self.flops_of[stage]
    peak = nominal_peak_flops(jax.devices()[0])
    source = 'datasheet'
    if peak is None:  # CPUs and unknown chips: what XLA's matmul reaches on this device.
      peak, source = measured_matmul_peak(self.var_config.dtype), 'measured matmul'
    self.peak_flops = peak * jax.device_count()
    if multihost.is_main_process():
      mem = stats['memory'] or {}
      gib = lambda k: mem.get(k, 0) / 2 ** 30
      logging.info('train step compiled in %.1f s: %.3g useful FLOPs per step (XLA counts %s per device); '
                   'per device: %.2f GiB needed (arguments %.2f, temporaries %.2f, outputs %.2f, donated '
                   '%.2f); MFU against %.3g FLOP/s per device (%s)', time.perf_counter() - t,
                   self.step_flops, 'n/a' if stats['xla_flops'] is None else f'{stats["xla_flops"]:.3g}',
                   (needed_bytes(mem) or 0) / 2 ** 30, gib('argument_size_in_bytes'),
                   gib('temp_size_in_bytes'), gib('output_size_in_bytes'), gib('alias_size_in_bytes'),
                   peak, source)
    return compiled

  def record(self, metrics, steps, seconds):
    return {'tokens_per_s': steps * self.global_batch * self.var_config.seq_len / seconds,
            'mfu': steps * self.step_flops / seconds / self.peak_flops}

  def progress(self, m):
    return f'loss {m["loss"]:.4f} acc {m["accuracy"]:.3f} lr {m["lr"]:.2e}'

  @property
  def skipped_examples(self):
    return self.data.skipped

  def evaluate(self, step, state, writer):
    params = state.ema_params if state.ema_params is not None else state.params
    last = step == self.total_steps
    if self.grids is not None and (step % self.sample_every == 0 or last):
      path = self.grids.write(step, params, self.vae_replicated, writer)
      if path:
        logging.info('sample grid: %s', path)
    if self.heldout is None or not (step % self.heldout[2] == 0 or last):
      return None
    ids, labels, _ = self.heldout
    c = self.var_config
    r = heldout_token_loss(c, params, self.vq, self.vae_replicated, ids, labels,
                           batch_size=min(len(ids), 4 * self.global_batch))
    if multihost.is_main_process():
      logging.info('held-out token loss at step %d: %.4f over %d examples (per scale %s)', step, r['mean_loss'],
                   r['examples'], ' '.join(f'{x:.3f}' for x in r['loss']))
    return {'heldout_loss': r['mean_loss'], 'heldout_loss_per_scale': r['loss'],
            'heldout_accuracy_per_scale': r['accuracy'], 'heldout_examples': r['examples']}

  def export(self, step, state):
    return export_transformer(self.workdir, step, state, self.var_config)


def run(config, workdir: str, stop_after_steps: int | None = None, return_state: bool = False) -> dict:
  """Trains to config.train.steps (or stops after `stop_after_steps` steps of this call, saving)."""
  return driver.run(TransformerTask(with_defaults(config), workdir), stop_after_steps=stop_after_steps,
                    return_state=return_state)
