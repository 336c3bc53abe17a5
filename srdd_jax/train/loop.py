"""`--mode=train`: the transformer on tokens of the frozen tokenizer, sharded, checkpointed, logged.

Sections: mesh -> tokenizer -> data -> trainer (abstract state, shardings, jitted init) -> restore ->
step -> loop (log, checkpoint, SIGTERM). Every batch and every random draw is a function of the step,
so a run resumed from a checkpoint continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
from absl import logging

from srdd_jax.convert import params_io
from srdd_jax.data.synthetic import SyntheticImages
from srdd_jax.parallel import mesh as pm
from srdd_jax.tokenizer.api import Tokenizer, unbox
from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.train.checkpoint import Checkpointer
from srdd_jax.train.optimizer import OptimConfig
from srdd_jax.train.step import Trainer
from srdd_jax.transformer.config import VARConfig


class TrainConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


class NonFiniteLoss(FloatingPointError):
  pass


def _tokenizer(config):
  tc = config.tokenizer
  if tc.checkpoint:
    if not os.path.isdir(tc.checkpoint):
      raise TrainConfigError(f'config.tokenizer.checkpoint={tc.checkpoint!r} does not exist')
    return params_io.load_vqvae(tc.checkpoint)
  vq = VQVAEConfig(vocab_size=tc.vocab_size, z_channels=tc.z_channels, ch=tc.ch, ch_mult=tuple(tc.ch_mult),
                   patch_nums=tuple(config.model.patch_nums))
  logging.warning('config.tokenizer.checkpoint is empty: a freshly initialised (seed %d) tokenizer is '
                  'used, fine for smoke runs only', config.seed)
  return vq, unbox(Tokenizer(vq).init(jax.random.PRNGKey(config.seed + 1)))


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


def run_train(config, workdir: str, stop_after_steps: int | None = None, return_state: bool = False) -> dict:
  """Trains to config.train.steps (or stops after `stop_after_steps` steps of this call, saving)."""
  t_start = time.time()
  # --- mesh and tokenizer ---
  try:
    mesh = pm.make_mesh(dict(config.mesh))
  except ValueError as e:
    raise TrainConfigError(f'config.mesh: {e}') from e
  vq, vae_params = _tokenizer(config)
  _validate(config, mesh, vq)
  m = config.model
  var_config = VARConfig(depth=m.depth, width=m.width, num_heads=m.heads, num_classes=m.num_classes,
                         vocab_size=vq.vocab_size, z_channels=vq.z_channels, patch_nums=tuple(m.patch_nums),
                         mask=m.mask, dtype=m.dtype, cond_drop_rate=m.cond_drop_rate,
                         drop_path_rate=m.drop_path_rate)
  t = config.train
  total = int(t.steps)
  o = config.optim
  optim = OptimConfig(peak_lr=o.base_lr * t.global_batch / 256, weight_decay=o.weight_decay,
                      weight_decay_end=o.weight_decay_end, warmup_steps=int(o.warmup_steps),
                      total_steps=total, final_fraction=o.final_fraction, clip_norm=o.clip_norm)
  # --- data ---
  data = SyntheticImages(config.data.num_examples, m.num_classes, vq.image_size)
  # --- trainer, state, restore ---
  trainer = Trainer(var_config, vq, optim, mesh, accum_steps=int(t.accum_steps),
                    ema_decay=float(t.ema_decay), seed=int(config.seed))
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=int(t.keep_checkpoints),
                      save_every=int(t.checkpoint_every))
  abstract, shardings = trainer.abstract_state()
  restored = ckpt.restore_latest(abstract, shardings)
  if restored:
    state, _, start = restored
    logging.info('resumed from step %d', start)
  else:
    state, start = trainer.init(jax.random.PRNGKey(config.seed)), 0
  step_fn = trainer.make_step(vae_params)
  encode = jax.jit(Tokenizer(vq).img_to_idx)
  # --- logging ---
  main_process = jax.process_index() == 0
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  writer = None
  if main_process:
    from clu import metric_writers  # pylint: disable=import-outside-toplevel
    writer = metric_writers.create_default_writer(workdir)
  stop = {'sigterm': False}
  previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
  tokens_per_step = t.global_batch * var_config.seq_len
  last_loss, step, t_log, n_log = None, start, time.time(), 0
  try:
    while step < total:
      images, labels = data.batch(int(config.seed), step, int(t.global_batch))
      ids = jnp.concatenate(encode(vae_params, images), axis=1)
      state, metrics = step_fn(state, trainer.shard_batch({'labels': labels, 'ids': ids}))
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
               'examples_seen': step * int(t.global_batch)}
        if main_process:
          with open(metrics_path, 'a') as f:
            f.write(json.dumps(rec) + '\n')
          writer.write_scalars(step, {k: v for k, v in rec.items() if k != 'step'})
          eta = (total - step) / max(rec['steps_per_s'], 1e-9)
          logging.info('step %d/%d loss %.4f acc %.3f lr %.2e %.2f steps/s ETA %.0fs', step, total,
                       rec['loss'], rec['accuracy'], rec['lr'], rec['steps_per_s'], eta)
        t_log, n_log = time.time(), 0
      ckpt.save(step, state, {'step': step})
      if stop['sigterm'] or (stop_after_steps is not None and step - start >= stop_after_steps):
        ckpt.save(step, state, {'step': step}, force=True)
        logging.info('stopping at step %d (%s); checkpoint saved', step,
                     'SIGTERM' if stop['sigterm'] else 'requested')
        break
    if step == total:
      ckpt.save(step, state, {'step': step}, force=True)
  finally:
    ckpt.close()
    signal.signal(signal.SIGTERM, previous)
    if writer is not None:
      writer.flush()
  summary = {'start_step': start, 'end_step': step, 'last_loss': last_loss,
             'seconds': round(time.time() - t_start, 2), 'workdir': workdir}
  if return_state:
    summary['state'] = state
  return summary
