"""`--mode=train_tokenizer`: the multi-scale VQ-VAE trained on images, sharded, checkpointed, logged.

Outputs, all under WORKDIR/tokenizer/:
  checkpoints/       Orbax train state (exact resume, also on another mesh).
  metrics.jsonl      One line per logged step (losses, per-scale code usage and perplexity, restarted and
                     dead codes, lr, steps/s, ETA) and one per evaluation (held-out PSNR); process 0.
  reconstructions.png  Held-out images (top row) and their reconstructions (bottom), at each evaluation.
  params/            The finished tokenizer for `params_io.load_vqvae` (and config.tokenizer.checkpoint),
                     written when training reaches config.tokenizer_train.steps. An existing export of
                     another step is never overwritten: it is moved to params.step_<its step> first.
  TensorBoard events.
"""
from __future__ import annotations

import os
import time

import jax
from absl import logging

from srdd_jax.config import ConfigError, with_defaults
from srdd_jax.data import pipeline
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import multihost
from srdd_jax.tokenizer.api import tokenizer_config
from srdd_jax.train import driver
from srdd_jax.train import tokenizer_settings as settings
from srdd_jax.train.export import export_tokenizer
from srdd_jax.train.tokenizer_eval import HeldOut, write_grid
from srdd_jax.train.tokenizer_step import trainer_for

SUBDIR = 'tokenizer'
# Sources whose held-out images come from another split of the same data set.
_SPLIT_SOURCES = ('digits', 'fashion_mnist', 'tfds')


def _sources(config, s: settings.TrainSettings, image_size: int):
  """(training source, held-out source or None)."""
  d = {k: v for k, v in config.data.to_dict().items() if k != 'token_cache'}
  train = pipeline.build_source(d, image_size, train=True)
  if not (s.eval_every > 0 and s.eval_examples > 0):
    return train, None
  e = dict(d, random_crop=False, flip=False)  # Centre crops, no flips: the same images every time.
  src = e.get('source')
  if src in _SPLIT_SOURCES:
    e['split'] = s.eval_split
  elif src == 'folder' and s.eval_path:
    e['path'] = s.eval_path
  else:
    logging.warning('config.data.source=%r has no held-out split%s: the PSNR is measured on training '
                    'images', src, ' (set config.tokenizer_train.eval_path)' if src == 'folder' else '')
  return train, pipeline.build_source(e, image_size, train=False)


class TokenizerTask(driver.Task):
  """The tokenizer's state, step, held-out PSNR and export, for the shared driver."""

  name = 'tokenizer'

  def __init__(self, config, workdir: str):
    s = self.s = settings.train_settings(config)
    vq = self.vq = tokenizer_config(config)
    mesh = pm.mesh_from_config(config)
    settings.validate_against(s, vq, mesh)
    self.workdir, self.root = workdir, os.path.join(workdir, SUBDIR)
    self.data, held_out_source = _sources(config, s, vq.image_size)
    self.trainer = trainer_for(vq, s, mesh, pm.rules_from_config(config))
    self.held_out = HeldOut(held_out_source, s, self.trainer, mesh) if held_out_source is not None else None
    self.total_steps, self.global_batch = s.steps, s.global_batch
    self.log_every, self.checkpoint_every, self.keep_checkpoints = s.log_every, s.checkpoint_every, s.keep_checkpoints
    self.eval_every = s.eval_every if self.held_out is not None else 0
    self.eval_at_start = True
    self.grid_path = os.path.join(self.root, 'reconstructions.png')
    self.psnr_first = self.psnr_last = None
    self.usage_last = None
    if multihost.is_main_process():
      logging.info('tokenizer: %d px, patch_nums %s, V=%d, Cvae=%d, ch=%d; data: %s; %d steps of %d (%.2f '
                   'epochs); GAN %s; mesh %s; %d process(es)', vq.image_size, vq.patch_nums, vq.vocab_size,
                   vq.z_channels, vq.ch, self.data.description, s.steps, s.global_batch,
                   s.steps * s.global_batch / self.data.num_examples,
                   f'weight {s.gan_weight} from step {s.gan_start_step}' if s.use_gan else 'off',
                   dict(mesh.shape), jax.process_count())

  def abstract_state(self):
    return self.trainer.abstract_state()

  def init(self):
    return self.trainer.init(jax.random.PRNGKey(self.s.seed))

  def begin(self, start_step):
    s, rows = self.s, self.trainer.local_rows(self.global_batch)
    if s.prefetch:
      self.batches = self.data.iterator(s.seed, start_step, s.global_batch, rows)
    else:
      self.batches = (self.data.batch(s.seed, k, s.global_batch, rows) for k in range(start_step, s.steps))

  def step(self, state):
    images, _ = next(self.batches)
    return self.trainer.step_fn(state, self.trainer.assemble_batch({'images': images}, self.global_batch))

  def progress(self, m):
    usage = ' '.join(f'{m[f"usage_s{k}"]:.2f}' for k in range(self.vq.num_scales))
    return (f'loss {m["loss"]:.4f} (l1 {m["l1"]:.4f} l2 {m["l2"]:.4f} vq {m["vq_loss"]:.4f}) usage/scale '
            f'[{usage}] dead {m["dead_codes"]:.0f} restarted {m["restarted_codes"]:.0f}')

  @property
  def skipped_examples(self):
    return self.data.skipped

  def evaluate(self, step, state, writer):
    t0 = time.time()
    value, usage, originals, recons = self.held_out.evaluate(state.params)
    if multihost.is_main_process():
      grid = write_grid(self.grid_path, originals, recons)
      writer.write_images(step, {'reconstructions': grid[None]})
      per_scale = ' '.join(f'{usage[f"eval_usage_s{k}"]:.2f}' for k in range(self.vq.num_scales))
      logging.info('step %d: held-out PSNR %.2f dB over %d images (%s); codes used per scale [%s], %d of '
                   '%d used at no scale', step, value, self.held_out.n, self.held_out.description, per_scale,
                   usage['eval_dead_codes'], self.vq.vocab_size)
    if self.psnr_first is None and step == 0:
      self.psnr_first = value
    self.psnr_last = value
    self.usage_last = usage
    return {'eval_psnr': value, **usage, 'eval_examples': self.held_out.n, 'eval_seconds': time.time() - t0}

  def export(self, step, state):
    out = export_tokenizer(self.root, state.params, self.vq, step, self.workdir)
    logging.info('tokenizer exported to %s (config.tokenizer.checkpoint=%s)', out, out)
    return out

  def summary(self):
    return {'eval_psnr_start': self.psnr_first, 'eval_psnr_end': self.psnr_last,
            **{f'{k}_end': v for k, v in (self.usage_last or {}).items()}}


def run(config, workdir: str, stop_after_steps: int | None = None, return_state: bool = False) -> dict:
  """Trains to config.tokenizer_train.steps (or stops after `stop_after_steps` steps of this call,
  saving a checkpoint) and exports the tokenizer when training is complete."""
  if 'data' not in config:
    raise ConfigError('config.data is missing: say which images to train on (srdd_jax/data/pipeline.py)')
  config = with_defaults(config)
  return driver.run(TokenizerTask(config, workdir), stop_after_steps=stop_after_steps,
                    return_state=return_state)
