"""`--mode=all`: every stage of a config in order, each resumable, with the wall time of each.

  tokenizer   --mode=train_tokenizer   (skipped when config.tokenizer.checkpoint names a trained one)
  tokenize    --mode=tokenize          (skipped when WORKDIR/tokens is complete)
  train       --mode=train             (on the token cache; resumes from its checkpoints)
  sample      --mode=sample            (config.sample: grid, per-image PNGs, samples.npz)
  evaluate    --mode=eval              (config.eval on those samples; proxy metrics offline)

Running it again after an interruption continues where it stopped: finished stages are skipped (their
outputs are kept, never recomputed or overwritten) and the interrupted one resumes from its checkpoint.
A training stage stopped by SIGTERM or Ctrl-C ends the run with exit status 75 (see main.py).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
from PIL import Image

from srdd_jax.config import with_defaults
from srdd_jax.data.images import grid
from srdd_jax.modes import eval as evaluation
from srdd_jax.modes import sample, tokenize, train, train_tokenizer
from srdd_jax.parallel import multihost
from srdd_jax.parallel.workdir import Units


def run(config, workdir: str) -> dict:
  config = with_defaults(config)
  results, t_all = {}, time.time()
  units = Units(workdir, label='=== stage')

  def stage(name, fn, output=None):
    """Runs stage `name` (its summary kept for summary.json); with `output`, only when that file, which
    the stage writes, does not exist yet (the stage is done: its outputs are kept)."""
    out = units(name, fn, output) if output else units.timed(name, fn)
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
  if not config.tokenizer.checkpoint:
    summary = stage('train_tokenizer', lambda: train_tokenizer.run(config, workdir))
    if not summary.get('export'):
      return stopped('train_tokenizer', summary)
    config.tokenizer.checkpoint = summary['export']
  # --- token cache ---
  cache = config.tokenize.out_dir or os.path.join(workdir, 'tokens')
  stage('tokenize', lambda: tokenize.run(config, workdir), output=os.path.join(cache, 'manifest.json'))
  config.data.token_cache = cache
  # --- transformer ---
  summary = stage('train', lambda: train.run(config, workdir))
  if not summary.get('export'):
    return stopped('train', summary)
  config.model.checkpoint = summary['export']
  # --- samples ---
  samples = os.path.join(workdir, 'samples', 'samples.npz')
  # Outputs of an interrupted sample stage (no samples.npz yet) are replaced.
  stage('sample', lambda: sample.run(config, workdir, overwrite=True), output=samples)
  if multihost.is_main_process():
    _small_grid(samples, os.path.join(workdir, 'samples', 'grid_10x10.png'), per=10)
  # --- evaluation ---
  config.eval.samples = samples
  stage('eval', lambda: evaluation.run(config, workdir, overwrite=True),
        output=os.path.join(workdir, 'eval', 'eval.json'))
  summary = {'seconds': {**seconds(), 'total': round(time.time() - t_all, 1)}, 'stages': results,
             'outputs': {
                 'tokenizer': config.tokenizer.checkpoint,
                 'reconstructions': os.path.join(workdir, 'tokenizer', 'reconstructions.png'),
                 'token_cache': cache, 'model': config.model.checkpoint,
                 'sample_grid': os.path.join(workdir, 'samples', 'grid_10x10.png'), 'samples': samples,
                 'metrics': os.path.join(workdir, 'eval', 'eval.json')}}
  if multihost.is_main_process():
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=1, default=str)
  return summary


def _small_grid(samples_npz: str, out: str, per: int):
  """The first `per` samples of each class, a row per class."""
  with np.load(samples_npz) as z:
    images, labels = z['arr_0'], z['arr_1']
  rows = [images[labels == k][:per] for k in np.unique(labels)]
  Image.fromarray(grid(np.concatenate(rows), per)).save(out)
