"""The tokenizer's task for the shared driver (train/driver.py), --mode=train_tokenizer: its state, step,
held-out PSNR and reconstruction grid, and export. Built from pieces the runner made of the config
(train/tokenizer_settings.py)."""
from __future__ import annotations

import time

import jax
from absl import logging

from srdd_jax import files
from srdd_jax.parallel import multihost
from srdd_jax.train import driver
from srdd_jax.train.export import export_tokenizer
from srdd_jax.train.tokenizer_eval import HeldOut, write_grid
from srdd_jax.train.tokenizer_step import TokenizerTrainer


class TokenizerTask(driver.Task):
  """The tokenizer's state, step, held-out PSNR and export, for the shared driver: `trainer` trains on
  `data` (an image source), `held_out` (or None) measures the PSNR; outputs go under `root`, the export
  names `workdir` as its source."""

  name = 'tokenizer'
  steps_key = 'config.tokenizer_train.steps'

  def __init__(self, trainer: TokenizerTrainer, data, held_out: HeldOut | None, workdir: str, root: str):
    s = self.s = trainer.s
    self.trainer, self.vq, self.data, self.held_out = trainer, trainer.vq, data, held_out
    self.workdir, self.root = workdir, root
    self.total_steps, self.global_batch = s.steps, s.global_batch
    self.log_every, self.checkpoint_every, self.keep_checkpoints = s.log_every, s.checkpoint_every, s.keep_checkpoints
    self.eval_every = s.eval_every if self.held_out is not None else 0
    self.eval_at_start = True
    self.grid_path = files.join(self.root, 'reconstructions.png')
    self.psnr_first = self.psnr_last = None
    self.usage_last = None

  def abstract_state(self):
    return self.trainer.abstract_state()

  def init(self):
    return self.trainer.init(jax.random.PRNGKey(self.s.seed))

  def begin(self, start_step):
    s, rows = self.s, self.trainer.local_rows(self.global_batch)
    # Images as decoded (uint8, normalised on the devices), `prefetch` batches ahead on the devices.
    if s.prefetch:
      host = self.data.iterator(s.seed, start_step, s.global_batch, rows, raw=True)
    else:
      host = (self.data.batch(s.seed, k, s.global_batch, rows, raw=True) for k in range(start_step, s.steps))
    place = lambda b: self.trainer.assemble_batch({'images': b[0]}, self.global_batch)
    self.batches = multihost.prefetch_to_devices(host, place, 2 if s.prefetch else 0)

  def step(self, state):
    return self.trainer.step_fn(state, next(self.batches))

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
