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
from absl import logging
from PIL import Image

from srdd_jax.config import with_defaults
from srdd_jax.data.images import grid
from srdd_jax.modes import eval as evaluation
from srdd_jax.modes import sample, tokenize, train, train_tokenizer
from srdd_jax.parallel import multihost


def _done(path: str) -> bool:
  return os.path.exists(path)


def run(config, workdir: str) -> dict:
  config = with_defaults(config)
  times, results, t_all = {}, {}, time.time()

  def stage(name, fn):
    t0 = time.time()
    logging.info('=== stage %s ===', name)
    out = fn()
    times[name] = round(time.time() - t0, 1)
    results[name] = {k: v for k, v in (out or {}).items() if k != 'state'}
    logging.info('=== stage %s done in %.0fs ===', name, times[name])
    return out

  def stopped(name, summary):
    """The summary of a run whose training stage was stopped (SIGTERM, Ctrl-C) before its end."""
    return {'stopped_by': summary.get('stopped_by') or 'request', 'complete': False, 'stage': name,
            'end_step': summary.get('end_step'), 'seconds': times}

  # --- tokenizer ---
  if not config.tokenizer.checkpoint:
    summary = stage('train_tokenizer', lambda: train_tokenizer.run(config, workdir))
    if not summary.get('export'):
      return stopped('train_tokenizer', summary)
    config.tokenizer.checkpoint = summary['export']
  # --- token cache ---
  cache = config.tokenize.out_dir or os.path.join(workdir, 'tokens')
  if _done(os.path.join(cache, 'manifest.json')):
    logging.info('token cache %s is complete: kept', cache)
  else:
    stage('tokenize', lambda: tokenize.run(config, workdir))
  config.data.token_cache = cache
  # --- transformer ---
  summary = stage('train', lambda: train.run(config, workdir))
  if not summary.get('export'):
    return stopped('train', summary)
  config.model.checkpoint = summary['export']
  # --- samples ---
  samples = os.path.join(workdir, 'samples', 'samples.npz')
  if _done(samples):
    logging.info('%s exists: kept', samples)
  else:
    # Outputs of an interrupted sample stage (no samples.npz yet) are replaced.
    stage('sample', lambda: sample.run(config, workdir, overwrite=True))
  if multihost.is_main_process():
    _small_grid(samples, os.path.join(workdir, 'samples', 'grid_10x10.png'), per=10)
  # --- evaluation ---
  config.eval.samples = samples
  if _done(os.path.join(workdir, 'eval', 'eval.json')):
    logging.info('%s exists: kept', os.path.join(workdir, 'eval', 'eval.json'))
  else:
    stage('eval', lambda: evaluation.run(config, workdir, overwrite=True))
  summary = {'seconds': {**times, 'total': round(time.time() - t_all, 1)}, 'stages': results,
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
