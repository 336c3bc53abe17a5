"""Finished models, written once for sampling, evaluation and `config.*.checkpoint`; never replaced.

  WORKDIR/export/step_<n>      the transformer (EMA weights when kept), for params_io.load_var; its
                               model.json's `train` record says how it was trained (`run_record`), which
                               a fine-tune from it (config.train.init_from) reads to continue its data.
  WORKDIR/tokenizer/params     the tokenizer, for params_io.load_vqvae; an export of another step is
                               moved aside to params.step_<its step> first.
"""
from __future__ import annotations

import math

import jax
from absl import logging

from srdd_jax import files
from srdd_jax.convert import params_io
from srdd_jax.parallel import multihost
from srdd_jax.train.step import EMA_WARMUP, ema_start_weight
from srdd_jax.transformer.config import VARConfig

TOKENIZER_EXPORT_DIR = 'params'
TOKENIZER_EXPORT_MARKER = 'export.json'  # Beside model.json: which run and step the export holds.
TRAIN_RECORD = 'train'  # model.json's key of a trained transformer's record (run_record).


def data_stream(init_from: str, num_examples: int, global_batch: int, seed: int) -> dict:
  """Where a run's data stream starts: {'seed', 'first_step', 'init_from', 'skipped_examples'}. The batch
  of stream step s is a pure function of (seed, s) (data/source.py, data/token_cache.py), examples
  s * batch + p of the epochs' permutations. A fresh run starts at step 0 of its own seed. A fine-tune
  from an export that records its stream (run_record) on a data set of the same size continues it: the
  start model's seed, from the first step whose examples it never reached, so that no example is seen
  twice before the epoch ends (starting at step 0 again replayed the start model's examples and left
  the rest of the epoch unseen). A batch that does not divide the examples the start model drew skips
  fewer than one batch of them. `init_from` = {'source', 'step', 'total_steps'} of the start model (its
  step None where its export records none: convert_var's, or an earlier version's)."""
  own = {'seed': int(seed), 'first_step': 0, 'init_from': None, 'skipped_examples': 0}
  if not init_from:
    return own
  meta = params_io.model_meta(init_from)
  record = meta.get(TRAIN_RECORD) or {}
  data = record.get('data') or {}
  own['init_from'] = {'source': files.absolute(init_from), 'step': record.get('step'),
                      'total_steps': record.get('total_steps', record.get('step'))}
  if data.get('num_examples') != num_examples or 'next_example' not in data:
    if multihost.is_main_process():
      logging.info('%s records no data stream of %d examples (%s): the fine-tune starts its own at step 0 of '
                   'seed %d', init_from, num_examples,
                   f'its data had {data["num_examples"]}' if data else 'none recorded', seed)
    return own
  drawn = int(data['next_example'])
  first = math.ceil(drawn / global_batch)
  out = {**own, 'seed': int(data['seed']), 'first_step': first, 'skipped_examples': first * global_batch - drawn}
  if multihost.is_main_process():
    epoch, k = divmod(drawn, num_examples)
    logging.info('fine-tune from %s (step %s): its data stream continues at step %d of seed %d (example %d of '
                 'epoch %d%s)', init_from, record.get('step'), first, out['seed'], k, epoch,
                 f', {out["skipped_examples"]} skipped to align the batch' if out['skipped_examples'] else '')
  return out


def run_record(step: int, *, stream: dict, global_batch: int, num_examples: int, description: str,
               ema_decay: float, tokenizer: dict | None = None) -> dict:
  """model.json's `train` record of a transformer trained `step` steps of `global_batch` examples from
  the data stream `stream` (data_stream's): its steps, those of its start model added (total_steps), the
  stream (seed, first and next step, the next example a continuation draws), where it started and the
  weight its EMA's starting point still holds in the export (train/step.ema_start_weight: the random
  initialisation's, or the start model's for a fine-tune), and the tokenizer whose ids it learnt
  (`tokenizer`: convert.loading.tokenizer_identity's record, which sampling checks its tokenizer against)."""
  start = stream['init_from']
  first = int(stream['first_step'])
  return {
      'step': int(step),
      'total_steps': int(step) + int((start or {}).get('total_steps') or 0),
      'init_from': start,
      'data': {'description': description, 'num_examples': int(num_examples), 'seed': stream['seed'],
               'global_batch': int(global_batch), 'first_step': first, 'next_step': first + int(step),
               'next_example': (first + int(step)) * int(global_batch),
               'skipped_examples': int(stream['skipped_examples'])},
      'ema': {'decay': float(ema_decay), 'warmup': EMA_WARMUP, 'start_weight': ema_start_weight(ema_decay, step)},
      'tokenizer': tokenizer,
  }


def export_transformer(workdir: str, step: int, state, var_config: VARConfig, record: dict | None = None) -> str:
  """The trained transformer (EMA weights when kept) as a model directory that `--mode=sample`,
  `--mode=eval` and `params_io.load_var` read: WORKDIR/export/step_<n>, written once, never replaced;
  `record` (run_record's) goes into its model.json."""
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
  params_io.save_params(out, params, kind='var', config=var_config, source=f'{workdir} (train step {step})',
                        extra=None if record is None else {TRAIN_RECORD: record})
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
