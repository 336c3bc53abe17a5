"""The config sections of a transformer run (--mode=train, --mode=distill) read into the pieces its task
is built from: checked values, the mesh and tokenizer, the training data, the schedule and optimiser,
the trainer, the held-out set. Errors name the config key; values that cannot work whatever the data
and the mesh are refused before anything is loaded. (The tokenizer's are train/tokenizer_settings.py.)
"""
from __future__ import annotations

import math

import jax
from absl import logging

from srdd_jax import files
from srdd_jax.config import MAX_STEPS, ConfigError, unset_or_at_least
from srdd_jax.convert.loading import LoadedTokenizer, tokenizer_for_model
from srdd_jax.convert.params_io import model_identity
from srdd_jax.data import pipeline, token_cache
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import multihost
from srdd_jax.parallel.workdir import file_identity, training_inputs as config_inputs
from srdd_jax.train.optimizer import OptimConfig, peak_lr_for
from srdd_jax.train.progressive import Progressive
from srdd_jax.train.refine import check_reveal
from srdd_jax.train.step import Trainer, check_accum_steps
from srdd_jax.transformer.config import VARConfig


def check_ranges(config):
  """Values that cannot work whatever the data and the mesh; checked before anything is loaded."""
  t, o = config.train, config.optim
  check_accum_steps(t.accum_steps)
  check_reveal(t.refine_zero_prob, t.refine_max_ratio)
  for key in ('global_batch', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
    if int(t[key]) < 1:
      raise ConfigError(f'config.train.{key}={t[key]}: must be >= 1')
  for key in ('steps', 'epochs', 'sample_every', 'progressive_start_scales', 'progressive_steps',
              'heldout_every', 'heldout_examples'):
    if float(t[key]) < 0:
      raise ConfigError(f'config.train.{key}={t[key]}: must be >= 0')
  if not 0 <= float(t.ema_decay) < 1:
    raise ConfigError(f'config.train.ema_decay={t.ema_decay}: must be in [0, 1) (0 = no EMA)')
  # Every count of steps is compared with the step counter, a 32-bit integer on the accelerator.
  for key in ('steps', 'log_every', 'checkpoint_every', 'sample_every', 'progressive_steps', 'heldout_every',
              'progressive_warmup_steps'):
    if int(t[key]) > MAX_STEPS:
      raise ConfigError(f'config.train.{key}={t[key]}: the step counter is a 32-bit integer; at most {MAX_STEPS}')
  if int(o.warmup_steps) > MAX_STEPS:
    raise ConfigError(f'config.optim.warmup_steps={o.warmup_steps}: at most {MAX_STEPS} (a 32-bit step counter)')
  unset_or_at_least(int(t.progressive_warmup_steps), 'config.train.progressive_warmup_steps', 1,
                    meaning="is VAR's ramp (a 300th of training)")
  if not float(o.base_lr) > 0:
    raise ConfigError(f'config.optim.base_lr={o.base_lr}: must be > 0')
  peak = peak_lr_for(int(t.global_batch), float(o.base_lr))
  if peak > MAX_PEAK_LR:
    raise ConfigError(f'config.optim.base_lr={o.base_lr}: the peak learning rate would be {peak:.3g} (base_lr x '
                      f'global_batch {t.global_batch} / 256); AdamW moves every weight by about that much per '
                      f'step and training diverges: give a peak of at most {MAX_PEAK_LR:g} (VAR: 1e-4 x batch / 256)')
  if not 0 <= float(o.final_fraction) <= 1:
    raise ConfigError(f'config.optim.final_fraction={o.final_fraction}: must be in [0, 1]')
  unset_or_at_least(int(o.warmup_steps), 'config.optim.warmup_steps', 0, meaning='is VAR\'s (a fiftieth of training)')
  if not float(o.weight_decay) >= 0:
    raise ConfigError(f'config.optim.weight_decay={o.weight_decay}: must be >= 0 (0 = none)')
  unset_or_at_least(float(o.weight_decay_end), 'config.optim.weight_decay_end', 0,
                    meaning='keeps config.optim.weight_decay constant')
  if not float(o.clip_norm) >= 0:
    raise ConfigError(f'config.optim.clip_norm={o.clip_norm}: must be >= 0 (0 = no clipping)')


# The largest peak learning rate accepted: AdamW's step moves each weight by about the rate, and the
# weights start at a scale of 0.02 to 1; a rate of 1 or more destroys them in a step (base_lr=1e12 ended in
# a non-finite loss after the model was built and compiled).
MAX_PEAK_LR = 1.0


def check_mesh(config, mesh):
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


def mesh_and_tokenizer(config) -> tuple:
  """(mesh, LoadedTokenizer at the scales of config.model.patch_nums), after the checks of the values."""
  check_ranges(config)
  t = config.train
  if t.init_from and not files.isdir(t.init_from):
    raise ConfigError(f'config.train.init_from={t.init_from!r} does not exist: give a transformer '
                      'directory (WORKDIR/export/step_<n> of a training run, or convert_var output)')
  mesh = pm.mesh_from_config(config)
  check_mesh(config, mesh)
  return mesh, tokenizer_for_model(config)


def training_data(config, tok: LoadedTokenizer):
  """The training examples: a token cache (config.data.token_cache) or an image source; `yields` says
  which ('ids' or 'images'). `tok` is the LoadedTokenizer a cache must have been written by."""
  d = config.data.to_dict()
  cache = d.pop('token_cache', '')
  image_size = tok.config.image_size
  if cache:
    source = token_cache.TokenCache(cache, tokenizer=tok.identity, patch_nums=tok.config.patch_nums)
  else:
    if d.get('source') == 'synthetic' and d.get('num_classes') is None:
      d['num_classes'] = int(config.model.num_classes)
    source = pipeline.build_source(d, image_size, train=True)
  if source.num_classes > int(config.model.num_classes):
    raise ConfigError(f'config.model.num_classes={config.model.num_classes} but the data '
                      f'({source.description}) has {source.num_classes} classes')
  check_batch_fits(config.train.global_batch, source, 'config.train.global_batch')
  source.yields = 'ids' if cache else 'images'
  return source


def check_batch_fits(global_batch, source, key: str) -> None:
  """A batch larger than the data set would hold some examples twice in every step."""
  if int(global_batch) > source.num_examples:
    raise ConfigError(f'{key}={global_batch} is larger than the {source.num_examples} examples of '
                      f'{source.description}: give at most {source.num_examples}')


def schedule(config, num_examples: int, num_scales: int) -> tuple[int, OptimConfig, Progressive | None]:
  """(total steps, the optimiser's schedule, the progressive growth or None) of config.train and
  config.optim for a data set of `num_examples` and a model of `num_scales` scales."""
  t, o = config.train, config.optim
  gb = int(t.global_batch)
  total = int(t.steps) if int(t.steps) > 0 else math.ceil(float(t.epochs) * num_examples / gb)
  if total > MAX_STEPS:
    raise ConfigError(f'config.train.epochs={t.epochs}: {total} steps of {gb} of the {num_examples} examples; '
                      f'the step counter is a 32-bit integer: at most {MAX_STEPS} steps')
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
                                ramp if ramp > 0 else max(total // 300, 1), num_scales)
  except ValueError as e:
    raise ConfigError(f'config.train.progressive_start_scales/progressive_steps/progressive_warmup_steps '
                      f'(with the learning-rate warm-up of {warmup} steps): {e}') from e
  return total, optim, progressive


def trainer(cls, config, var_config: VARConfig, vq, optim: OptimConfig, mesh, progressive, **extra) -> Trainer:
  """`cls` (Trainer or a subclass, with its own arguments `extra`) with config.train's settings."""
  t = config.train
  try:
    return cls(var_config, vq, optim, mesh, rules=pm.rules_from_config(config), accum_steps=int(t.accum_steps),
               ema_decay=float(t.ema_decay), seed=int(config.seed), progressive=progressive, **extra)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(f'config.train: {e}') from e


def heldout_set(config, tok: LoadedTokenizer, var_config: VARConfig, total: int):
  """(ids, labels, every) of config.train.heldout_cache, or None. Read when the task is built: a wrong
  cache fails before any step, not at the end."""
  t = config.train
  if not t.heldout_cache:
    return None
  cache = token_cache.TokenCache(t.heldout_cache, tokenizer=tok.identity, patch_nums=var_config.patch_nums,
                                 key='config.train.heldout_cache')
  n = int(t.heldout_examples) or len(cache.ids)
  return cache.ids[:n, 0], cache.labels[:n], int(t.heldout_every) or total


def training_inputs(config, tok: LoadedTokenizer, sections, **identities) -> dict:
  """What a transformer's checkpoints are made from (driver.Task.inputs): the config's `sections` (less
  what a resumed run may change), the tokenizer (its architecture and weights, not its path), the token
  cache's manifest, the start model of a fine-tune, and `identities`."""
  cache = config.data.get('token_cache') or ''
  return config_inputs(
      config, sections, tokenizer=tok.identity()['hash'],
      token_cache=file_identity(files.join(cache, token_cache.MANIFEST)) if cache else None,
      init_from=model_identity(config.train.init_from) if config.train.init_from else None, **identities)


def loop_settings(config) -> dict:
  """The arguments of TransformerTask that config.train and config.seed give directly."""
  t = config.train
  return dict(global_batch=int(t.global_batch), seed=int(config.seed), log_every=int(t.log_every),
              checkpoint_every=int(t.checkpoint_every), keep_checkpoints=int(t.keep_checkpoints),
              sample_every=int(t.sample_every), init_from=t.init_from)


def log_run(config, data, total: int, var_config: VARConfig, mesh):
  if multihost.is_main_process():
    gb = int(config.train.global_batch)
    logging.info('data: %s; %d steps of %d examples (%.2f epochs); model %s, %d scales, mask %s; mesh %s; '
                 '%d process(es)', data.description, total, gb, total * gb / data.num_examples,
                 config.model.preset or f'depth {var_config.depth}', var_config.num_scales, var_config.mask,
                 dict(mesh.shape), jax.process_count())
