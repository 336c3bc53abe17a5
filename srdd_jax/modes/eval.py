"""`--mode=eval`: N samples with distinct per-batch seeds (split over the mesh), then the metrics.

  python -m srdd_jax.main --config=configs/sample.py --workdir=DIR --mode=eval \
      --config.model.checkpoint=... --config.tokenizer.checkpoint=... \
      --config.eval.metrics=fid,is,pr --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth \
      --config.eval.reference=VIRTUAL_imagenet256_labeled.npz

Writes DIR/eval/samples.npz (arr_0 uint8 NHWC, arr_1 labels: what OpenAI's evaluator reads) and
DIR/eval/eval.json (the metrics with the protocol that produced them); DIR/eval is replaced whole once
the new evaluation is complete (parallel/workdir.Outputs). FID, IS and precision/recall use
only verified FID Inception weights: without them the run stops before sampling; it never prints a
number computed from other weights. `proxy` (the project's own classifier of the data set: `fd_<name>`,
`class_consistency`) needs no download and is what the offline data sets report.
"""
from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
from absl import logging

from srdd_jax import files
from srdd_jax.config import ConfigError, ints, with_defaults
from srdd_jax.diffusion.generate import generate, sampler_from_config, sampling_batch
from srdd_jax.evaluation import protocol
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import multihost
from srdd_jax.parallel.workdir import Outputs, file_identity


def options(config) -> dict:
  """config.eval as a dict, with `metrics` parsed and checked."""
  o = with_defaults(config).eval.to_dict()
  o['metrics'] = tuple(m.strip() for m in str(o['metrics']).split(',') if m.strip())
  bad = [m for m in o['metrics'] if m not in protocol.METRICS]
  if bad or not o['metrics']:
    raise ConfigError(f'config.eval.metrics={",".join(o["metrics"])!r}: choose from {protocol.METRICS}')
  return o


def check_data(config, o) -> None:
  if 'proxy' in o['metrics'] and config.data.source == 'synthetic':
    raise ConfigError('config.data is missing (its source is the default, synthetic): the proxy metrics '
                      'compare with held-out real images of a data set (its test split); set config.data')


def check_count(o, n: int) -> None:
  if n < 2:
    where = f'config.eval.samples={o["samples"]!r}' if o['samples'] else 'config.eval.num_per_class x classes'
    raise ConfigError(f'{where} gives {n} image(s): the metrics compare distributions and need at least 2 (the '
                      'protocol uses 50 per class)')


def labels_required(o) -> bool:
  """Whether a samples file must carry its labels: the proxy metrics' class consistency compares them."""
  return 'proxy' in o['metrics']


def counts(o, nc: int) -> tuple[tuple[int, ...], int]:
  """(classes, samples per class) of config.eval for a model of `nc` classes, checked."""
  classes = ints(o['classes'], 'config.eval.classes') or tuple(range(nc))
  bad = [k for k in classes if not 0 <= k < nc]
  if bad:
    raise ConfigError(f'config.eval.classes: class {bad[0]} is out of range 0..{nc - 1}')
  per = int(o['num_per_class'])
  if per < 1:
    raise ConfigError(f'config.eval.num_per_class={per} must be >= 1')
  return classes, per


def _inside(path: str, folder: str) -> bool:
  return files.is_within(path, folder)


def run(config, workdir: str, overwrite: bool = False) -> dict:
  config = with_defaults(config)
  o = options(config)
  outputs = Outputs(files.join(workdir, 'eval'), 'evaluation', overwrite)
  if multihost.is_main_process():
    outputs.claim()
  t0 = time.time()
  # Everything that can be wrong is checked before the (long) sampling.
  inception_params, inception_info = (protocol.verified_inception(o) if set(o['metrics']) & set(protocol.INCEPTION_METRICS)
                                      else (None, None))
  ref = protocol.check_reference(o)
  check_data(config, o)
  bs = int(o['batch_size'])  # The batch sampled with (cut to the images it draws, below).
  if o['samples']:
    images, labels, sampler = protocol.load_samples(o['samples'], labels_required(o)) + (None,)
    classes, per = (None if labels is None else tuple(sorted(set(labels.tolist())))), None
  else:
    sampler, var_params, vae_params = sampler_from_config(config)
    classes, per = counts(o, sampler.var_config.num_classes)
    labels = np.repeat(np.asarray(classes, np.int32), per)
    bs = sampling_batch(int(o['batch_size']), len(labels), pm.data_parallel_size(sampler.mesh),
                        'config.eval.batch_size')
    logging.info('eval: sampling %d images (%d classes x %d) for %s', len(labels), len(classes), per,
                 ', '.join(o['metrics']))
    images = generate(sampler, var_params, vae_params, labels, bs, int(config.seed), key='config.eval.batch_size')
  t_sample = time.time() - t0
  check_count(o, len(images))
  results: dict = {}
  if inception_params is not None:
    results.update(protocol.inception_metrics(o, inception_params, ref, images))
  if 'proxy' in o['metrics']:
    results.update(protocol.proxy_metrics(config, o, images, labels, workdir))
  summary = {
      'metrics': results,
      'protocol': {'num_samples': int(len(images)), 'classes': None if classes is None else list(classes),
                   'per_class': per,
                   'seed': int(config.seed), 'seeds': f'batch i uses fold_in(PRNGKey({int(config.seed)}), i)',
                   'batch_size': bs, 'mask': sampler.mask if sampler else None,
                   'sampler': dataclasses.asdict(sampler.config) if sampler else None,
                   'samples': o['samples'] or None,
                   # Which file exactly: a later --mode=sample --overwrite replaces it (size, time).
                   'samples_file': file_identity(o['samples']) if o['samples'] else None,
                   'model': config.model.checkpoint if sampler else None,
                   'tokenizer': config.tokenizer.checkpoint if sampler else None,
                   'reference': o['reference'] or None,
                   'inception_weights_sha256': inception_info['sha256'] if inception_info else None},
      'seconds': {'sampling': round(t_sample, 2), 'total': round(time.time() - t0, 2)},
  }
  if multihost.is_main_process():
    out = outputs.begin()
    if not o['samples']:
      files.save_npz(files.join(out, 'samples.npz'), arr_0=images, arr_1=labels)
    elif _inside(o['samples'], outputs.final):  # Samples an earlier evaluation wrote: they stay.
      files.copy(o['samples'], files.join(out, files.relpath(o['samples'], outputs.final)))
    files.write_json(files.join(out, 'eval.json'), summary)
    outputs.commit()
    logging.info('eval: %s', json.dumps(results))
  return summary
