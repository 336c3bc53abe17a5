"""Finished models, written once for sampling, evaluation and `config.*.checkpoint`; never replaced.

  WORKDIR/export/step_<n>      the transformer (EMA weights when kept), for params_io.load_var.
  WORKDIR/tokenizer/params     the tokenizer, for params_io.load_vqvae; an export of another step is
                               moved aside to params.step_<its step> first.
"""
from __future__ import annotations

import jax
from absl import logging

from srdd_jax import files
from srdd_jax.convert import params_io
from srdd_jax.parallel import multihost
from srdd_jax.transformer.config import VARConfig

TOKENIZER_EXPORT_DIR = 'params'
TOKENIZER_EXPORT_MARKER = 'export.json'  # Beside model.json: which run and step the export holds.


def export_transformer(workdir: str, step: int, state, var_config: VARConfig) -> str:
  """The trained transformer (EMA weights when kept) as a model directory that `--mode=sample`,
  `--mode=eval` and `params_io.load_var` read: WORKDIR/export/step_<n>, written once, never replaced."""
  out = files.join(workdir, 'export', f'step_{step:08d}')
  if files.exists(files.join(out, params_io.MODEL_JSON)):
    return out
  cut_short = files.exists(out)  # Params without model.json: an earlier version's export, cut short.
  multihost.sync('transformer-export-look')  # Every process looks before process 0 removes it.
  if cut_short:
    if multihost.is_main_process():
      logging.warning('%s holds no model.json (an export cut short): written again', out)
      files.rmtree(out)
  params = state.ema_params if state.ema_params is not None else state.params
  params_io.save_params(out, params, kind='var', config=var_config, source=f'{workdir} (train step {step})')
  logging.info('exported the trained transformer to %s', out)
  return out


def export_tokenizer(out_root: str, params, vq, step: int, workdir: str) -> str:
  """Writes the finished tokenizer to out_root/params; an export of another step is moved aside first
  (to params.step_<n>), one of this very step is left as it is. Returns the export's path."""
  out = files.join(out_root, TOKENIZER_EXPORT_DIR)
  marker = files.join(out, TOKENIZER_EXPORT_MARKER)
  host_params = jax.tree_util.tree_map(multihost.gather, params)  # Collective: every process joins.
  # Every process looks before any of them moves or writes (process 0 creating the directory must not
  # make another believe an old export is there), so all take the same branch below.
  multihost.sync('tokenizer-export-look')
  exists, old_step = files.exists(out), None
  if files.isfile(marker):
    old_step = files.read_json(marker).get('step')
  multihost.sync('tokenizer-export-looked')
  if exists:
    if old_step == step:
      logging.info('the tokenizer of step %d is already exported to %s', step, out)
      return out
    if multihost.is_main_process():
      base = f'{out}.step_{old_step}' if old_step is not None else f'{out}.previous'
      aside, k = base, 1
      while files.exists(aside):
        aside, k = f'{base}.{k}', k + 1
      files.rename(out, aside)
      logging.warning('%s held the tokenizer of step %s; moved to %s', out, old_step, aside)
    multihost.sync('tokenizer-export-aside')
  params_io.save_params(out, host_params, kind='vqvae', config=vq, source=f'train_tokenizer {workdir}')
  if multihost.is_main_process():
    files.write_json(marker, {'step': step, 'workdir': files.absolute(workdir)}, indent=None)
  multihost.sync('tokenizer-export-done')
  return out
