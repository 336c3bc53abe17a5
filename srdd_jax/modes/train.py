"""`--mode=train`: the transformer on tokens of the frozen tokenizer, sharded, checkpointed, logged.

Pieces, read from the config by train/transformer_setup.py: mesh -> tokenizer (config.tokenizer.checkpoint)
-> data (a token cache or images encoded in the step) -> Trainer (train/step.py) -> TransformerTask
(train/transformer_task.py) -> the shared driver (train/driver.py), with sample grids (diffusion/grids.py)
and the held-out token loss as the evaluations and WORKDIR/export/step_<n> as the export.
"""
from __future__ import annotations

from srdd_jax.config import with_defaults
from srdd_jax.convert.loading import check_tokenizer_of
from srdd_jax.diffusion.grids import SampleGrids
from srdd_jax.train import driver
from srdd_jax.train import transformer_setup as setup
from srdd_jax.train.refine import RefineTrainer
from srdd_jax.train.step import Trainer
from srdd_jax.train.transformer_task import TransformerTask
from srdd_jax.transformer.config import var_config as build_var_config


def task(config, workdir: str) -> TransformerTask:
  """The task of a resolved config (`with_defaults`): every piece built, every value checked."""
  mesh, tok = setup.mesh_and_tokenizer(config)
  if config.train.init_from:  # A fine-tune goes on learning its start model's tokens.
    check_tokenizer_of(config.train.init_from, 'config.train.init_from', tok)
  vq = tok.config
  var_config = build_var_config(config, vq.vocab_size, vq.z_channels)
  data = setup.training_data(config, tok)
  total, optim, progressive = setup.schedule(config, data.num_examples, var_config.num_scales)
  t = config.train
  # With the refine stream, the trainer that reveals part of each scale (train/refine.py).
  if var_config.refine:
    trainer = setup.trainer(RefineTrainer, config, var_config, vq, optim, mesh, progressive,
                            zero_prob=float(t.refine_zero_prob), max_ratio=float(t.refine_max_ratio))
  else:
    trainer = setup.trainer(Trainer, config, var_config, vq, optim, mesh, progressive)
  grids = SampleGrids(config, var_config, vq, mesh, workdir) if int(t.sample_every) > 0 else None
  heldout = setup.heldout_set(config, tok, var_config, total)
  setup.log_run(config, data, total, var_config, mesh)
  # A fresh tokenizer is initialised by tokenizer_for_model, once the config is known to work.
  out = TransformerTask(trainer, tok.params, data, workdir, total_steps=total, grids=grids, heldout=heldout,
                        tokenizer=tok.identity(), **setup.loop_settings(config))
  out.inputs = setup.training_inputs(config, tok, ('model', 'train', 'optim', 'data'))
  return out


def run(config, workdir: str, stop_after_steps: int | None = None, return_state: bool = False) -> dict:
  """Trains to config.train.steps (or stops after `stop_after_steps` steps of this call, saving)."""
  return driver.run(task(with_defaults(config), workdir), stop_after_steps=stop_after_steps,
                    return_state=return_state)
