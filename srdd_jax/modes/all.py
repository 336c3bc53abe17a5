"""`--mode=all`: every stage of a config in order, each resumable, with the wall time of each.

  tokenizer   --mode=train_tokenizer   (skipped when config.tokenizer.checkpoint names a trained one)
  tokenize    --mode=tokenize          (skipped when WORKDIR/tokens is complete)
  train       --mode=train             (on the token cache; resumes from its checkpoints)
  sample      --mode=sample            (config.sample: grid, per-image PNGs, samples.npz)
  evaluate    --mode=eval              (config.eval on those samples; proxy metrics offline)

Running it again after an interruption continues where it stopped: finished stages are skipped (their
outputs are kept) and the interrupted one resumes from its checkpoint. A training stage stopped by
SIGTERM or Ctrl-C ends the run with exit status 75 (see main.py).

Each stage's inputs (the model export and tokenizer it read, the config sections it used) are recorded
in WORKDIR/stages.json. Run again with other inputs, samples and evaluation are made again (replaced
whole, parallel/workdir.Outputs); the tokenizer, the token cache and the transformer, which hold
training work, are kept and the run stops with exit status 2 naming the change. Outputs of another
model are never presented as current.
"""
from __future__ import annotations

import json
import time

import numpy as np

from srdd_jax import files
from srdd_jax.config import with_defaults
from srdd_jax.convert.params_io import model_identity
from srdd_jax.data.images import grid
from srdd_jax.modes import eval as evaluation
from srdd_jax.modes import sample, tokenize, train, train_tokenizer
from srdd_jax.parallel import multihost
from srdd_jax.parallel.workdir import Units, file_identity, write_json

STAGES_FILE = 'stages.json'  # Each finished stage's inputs.
_REDONE = ('sample', 'eval')  # Stages made again when their inputs change; the others are refused.


def run(config, workdir: str) -> dict:
  config = with_defaults(config)
  results, t_all = {}, time.time()
  units = Units(workdir, label='=== stage', inputs_file=STAGES_FILE)

  def stage(name, fn, inputs, output=None, where=''):
    """Runs stage `name` (its summary kept for summary.json); with `output`, only when that file, which
    the stage writes, does not exist yet or was made from other `inputs` (samples, evaluation: made
    again) or refused (token cache); without, a training stage that resumes from its checkpoints (at
    `where`), refused when those were made from other `inputs`."""
    if output:
      out = units(name, fn, output, inputs=inputs, redo=name in _REDONE)
    else:
      out = units.timed(name, fn, inputs=inputs, where=where)
    if out is not None:
      results[name] = {k: v for k, v in out.items() if k != 'state'}
    return out

  def stopped(name, summary):
    """The summary of a run whose training stage was stopped (SIGTERM, Ctrl-C) before its end."""
    return {'stopped_by': summary.get('stopped_by') or 'request', 'complete': False, 'stage': name,
            'end_step': summary.get('end_step'), 'seconds': seconds()}

  def seconds():
    return {k: round(v, 1) for k, v in units.seconds.items()}

  # --- tokenizer ---
  data = {k: v for k, v in config.data.to_dict().items() if k != 'token_cache'}
  if not config.tokenizer.checkpoint:
    summary = stage('train_tokenizer', lambda: train_tokenizer.run(config, workdir),
                    {'config.tokenizer': _without(config.tokenizer, 'checkpoint'), 'config.data': data},
                    where=files.join(workdir, train_tokenizer.SUBDIR, 'checkpoints'))
    if not summary.get('export'):
      return stopped('train_tokenizer', summary)
    config.tokenizer.checkpoint = summary['export']
  # --- token cache ---
  cache = config.tokenize.out_dir or files.join(workdir, 'tokens')
  tokenizer = model_identity(config.tokenizer.checkpoint)
  stage('tokenize', lambda: tokenize.run(config, workdir),
        {'tokenizer': tokenizer, 'config.data': data, 'config.tokenize': config.tokenize.to_dict()},
        output=files.join(cache, 'manifest.json'))
  config.data.token_cache = cache
  # --- transformer ---
  summary = stage('train', lambda: train.run(config, workdir),
                  {'config.model': _without(config.model, 'checkpoint'), 'tokenizer': tokenizer,
                   'token_cache': file_identity(files.join(cache, 'manifest.json'))},
                  where=files.join(workdir, 'checkpoints'))
  if not summary.get('export'):
    return stopped('train', summary)
  config.model.checkpoint = summary['export']
  # --- samples ---
  samples = files.join(workdir, 'samples', 'samples.npz')
  # Samples of other inputs, or of an interrupted sample stage, are replaced whole.
  stage('sample', lambda: sample.run(config, workdir, overwrite=True),
        {'model': model_identity(config.model.checkpoint), 'tokenizer': tokenizer, 'seed': int(config.seed),
         'config.sampler': config.sampler.to_dict(), 'config.sample': config.sample.to_dict()}, output=samples)
  if multihost.is_main_process():
    _small_grid(samples, files.join(workdir, 'samples', 'grid_10x10.png'), per=10)
  # --- evaluation ---
  config.eval.samples = samples
  stage('eval', lambda: evaluation.run(config, workdir, overwrite=True),
        {'samples': file_identity(samples), 'seed': int(config.seed), 'config.data': data,
         'config.eval': config.eval.to_dict()}, output=files.join(workdir, 'eval', 'eval.json'))
  summary = {'seconds': {**seconds(), 'total': round(time.time() - t_all, 1)}, 'stages': results,
             'outputs': {
                 'tokenizer': config.tokenizer.checkpoint,
                 'reconstructions': files.join(workdir, 'tokenizer', 'reconstructions.png'),
                 'token_cache': cache, 'model': config.model.checkpoint,
                 'sample_grid': files.join(workdir, 'samples', 'grid_10x10.png'), 'samples': samples,
                 'metrics': files.join(workdir, 'eval', 'eval.json')}}
  summary['report'] = report(summary)
  if multihost.is_main_process():
    write_json(files.join(workdir, 'summary.json'), json.loads(json.dumps(summary, default=str)))
  return summary


def report(summary: dict) -> list[str]:
  """The lines a finished run ends with (main prints them last): where the outputs are, the numbers,
  and what they mean."""
  out = summary['outputs']
  try:
    metrics = files.read_json(out['metrics']).get('metrics', {})
  except (OSError, ValueError):
    metrics = {}
  lines = [f'samples:    {out["sample_grid"]} (a row per class), {out["samples"]}',
           f'evaluation: {out["metrics"]}; model {out["model"]}; stage times in summary.json']
  fd = {k: v for k, v in metrics.items() if k.startswith('fd_')}
  for k, v in fd.items():
    lines.append(f'{k} = {v:.2f}, class_consistency = {metrics.get("class_consistency", float("nan")):.3f}')
  if fd:
    lines.append('fd: Frechet distance between features of the samples and of the held-out test images, in the '
                 "project's own classifier (lower is closer; not FID); class consistency: the share of samples "
                 'that classifier assigns to the class they were drawn for.')
  for k in ('fid', 'inception_score'):
    if k in metrics:
      lines.append(f'{k} = {metrics[k]}')
  return lines


def _without(section, *keys) -> dict:
  return {k: v for k, v in section.to_dict().items() if k not in keys}


def _small_grid(samples_npz: str, out: str, per: int):
  """The first `per` samples of each class, a row per class."""
  with files.np_load(samples_npz) as z:
    images, labels = z['arr_0'], z['arr_1']
  rows = [images[labels == k][:per] for k in np.unique(labels)]
  files.save_image(out, grid(np.concatenate(rows), per))
