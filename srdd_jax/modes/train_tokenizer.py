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


import jax
from absl import logging

from srdd_jax import files
from srdd_jax.config import ConfigError, with_defaults
from srdd_jax.data import pipeline
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import multihost
from srdd_jax.parallel.workdir import training_inputs
from srdd_jax.tokenizer.api import tokenizer_config
from srdd_jax.train import driver
from srdd_jax.train import tokenizer_settings as settings
from srdd_jax.train.tokenizer_eval import HeldOut
from srdd_jax.train.tokenizer_step import trainer_for
from srdd_jax.train.tokenizer_task import TokenizerTask
from srdd_jax.train.transformer_setup import check_batch_fits

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


def task(config, workdir: str) -> TokenizerTask:
  """The task of a resolved config (`with_defaults`): every piece built, every value checked."""
  s = settings.train_settings(config)
  vq = tokenizer_config(config)
  mesh = pm.mesh_from_config(config)
  settings.validate_against(s, vq, mesh)
  data, held_out_source = _sources(config, s, vq.image_size)
  check_batch_fits(s.global_batch, data, 'config.tokenizer_train.global_batch')
  trainer = trainer_for(vq, s, mesh, pm.rules_from_config(config))
  held_out = HeldOut(held_out_source, s, trainer, mesh) if held_out_source is not None else None
  if multihost.is_main_process():
    logging.info('tokenizer: %d px, patch_nums %s, V=%d, Cvae=%d, ch=%d; data: %s; %d steps of %d (%.2f '
                 'epochs); GAN %s; mesh %s; %d process(es)', vq.image_size, vq.patch_nums, vq.vocab_size,
                 vq.z_channels, vq.ch, data.description, s.steps, s.global_batch,
                 s.steps * s.global_batch / data.num_examples,
                 f'weight {s.gan_weight} from step {s.gan_start_step}' if s.use_gan else 'off',
                 dict(mesh.shape), jax.process_count())
  out = TokenizerTask(trainer, data, held_out, workdir, files.join(workdir, SUBDIR))
  out.inputs = training_inputs(config, ('tokenizer', 'tokenizer_train', 'data'))
  return out


def run(config, workdir: str, stop_after_steps: int | None = None, return_state: bool = False) -> dict:
  """Trains to config.tokenizer_train.steps (or stops after `stop_after_steps` steps of this call,
  saving a checkpoint) and exports the tokenizer when training is complete."""
  if 'data' not in config:
    raise ConfigError('config.data is missing: say which images to train on (srdd_jax/data/pipeline.py)')
  config = with_defaults(config)
  return driver.run(task(config, workdir), stop_after_steps=stop_after_steps,
                    return_state=return_state)
