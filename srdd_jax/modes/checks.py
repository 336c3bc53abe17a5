"""`--dry_run`'s checks: each mode's checks of the config's values, the functions its runner calls first,
run here without loading a model or data set, so a bad value is refused before anything starts.

What needs files, the data or the weights (an image to edit, a batch larger than the data set, a token
cache of another tokenizer) is checked by the runner when it reads them, before its first step or sample.
"""
from __future__ import annotations

import types

from srdd_jax.convert.params_io import model_meta
from srdd_jax.data import pipeline
from srdd_jax.diffusion.generate import sampler_config_for
from srdd_jax.modes import edit, sample, study, tokenize
from srdd_jax.modes import eval as evaluation
from srdd_jax.parallel import mesh as pm
from srdd_jax.tokenizer.api import tokenizer_config
from srdd_jax.train import tokenizer_settings
from srdd_jax.train import transformer_setup as setup
from srdd_jax.transformer.config import var_config as build_var_config


def _saved_config(directory: str) -> dict:
  """The config in a model directory's model.json ({} when there is none yet)."""
  return model_meta(directory).get('config') or {}


def tokenizer_training(config) -> None:
  pipeline.check(config.data)
  s = tokenizer_settings.train_settings(config)
  tokenizer_settings.validate_against(s, tokenizer_config(config), pm.mesh_from_config(config))


def transformer_training(config) -> None:
  if not config.data.token_cache:
    pipeline.check(config.data)
  setup.check_ranges(config)
  setup.check_mesh(config, pm.mesh_from_config(config))
  vq = _saved_config(config.tokenizer.checkpoint) if config.tokenizer.checkpoint else {}
  build_var_config(config, vq.get('vocab_size', config.tokenizer.vocab_size),
                   vq.get('z_channels', config.tokenizer.z_channels))


def _model(config):
  """The sampled model's mask, scales and classes: config.model over the checkpoint's model.json."""
  saved = _saved_config(config.model.checkpoint) if config.model.checkpoint else {}
  return types.SimpleNamespace(mask=config.model.mask or saved.get('mask', 'markov'),
                               patch_nums=tuple(saved.get('patch_nums', config.model.patch_nums)),
                               num_classes=int(saved.get('num_classes', config.model.num_classes)))


def sampling(config) -> None:
  model = _model(config)
  sampler_config_for(config.sampler, model)
  sample.counts(config, model.num_classes)


def evaluation_(config) -> None:
  o = evaluation.options(config)
  if not o['samples']:
    sampler_config_for(config.sampler, _model(config))


def editing(config) -> None:
  edit.check(config.edit)
  model = _model(config)
  edit.check_keep_scales(config.edit, len(model.patch_nums))
  sampler_config_for(config.sampler, model)


def every_stage(config) -> None:
  if not config.tokenizer.checkpoint:
    tokenizer_training(config)
  tokenize.check(config)
  transformer_training(config)
  sampling(config)
  evaluation.options(config)


CHECKS = {
    'train_tokenizer': tokenizer_training,
    'tokenize': lambda config: (pipeline.check(config.data), tokenize.check(config)),
    'train': transformer_training,
    'sample': sampling,
    'eval': evaluation_,
    'edit': editing,
    'all': every_stage,
    'study': study.check,
    'ablation': study.check,
}


def validate(config, mode: str) -> None:
  """The checks of `mode` on a resolved config (`with_defaults`); ConfigError names the key."""
  check = CHECKS.get(mode)  # reconstruct and distill check their few values as they start.
  if check is not None:
    check(config)
