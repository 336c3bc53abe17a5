"""`--mode=eval`: N samples with distinct per-batch seeds (split over the mesh), then the metrics.

  python -m srdd_jax.main --config=configs/sample.py --workdir=DIR --mode=eval \
      --config.model.checkpoint=... --config.tokenizer.checkpoint=... \
      --config.eval.metrics=fid,is,pr --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth \
      --config.eval.reference=VIRTUAL_imagenet256_labeled.npz

Writes DIR/eval/samples.npz (arr_0 uint8 NHWC, arr_1 labels: what OpenAI's evaluator reads) and
DIR/eval/eval.json (the metrics with the protocol that produced them). FID, IS and precision/recall use
only verified FID Inception weights: without them the run stops before sampling; it never prints a
number computed from other weights. `proxy` (the project's own classifier of the data set: `fd_<name>`,
`class_consistency`) needs no download and is what the offline data sets report.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
from absl import logging

from srdd_jax.diffusion import cli
from srdd_jax.diffusion.cli import ConfigError
from srdd_jax.parallel import multihost

METRICS = ('fid', 'is', 'pr', 'proxy')
INCEPTION_METRICS = ('fid', 'is', 'pr')

DEFAULTS = dict(
    metrics='proxy',  # Comma-separated subset of fid, is, pr, proxy.
    classes='',  # '' = every class.
    num_per_class=50,  # The VAR/ADM protocol: 50 per class (50,000 for ImageNet).
    batch_size=16,
    inception_weights='',  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth or its converted .npz.
    reference='',  # .npz with mu/sigma (FID) and/or arr_0 images (FID, precision/recall).
    inception_batch_size=64,
    proxy_examples=10000,  # Held-out real images of config.data (its test split) for the proxy metrics.
    proxy_epochs=0,  # 0 = the classifier's default training length.
    samples='',  # An existing samples .npz (arr_0 uint8 NHWC, arr_1 labels) to evaluate instead of sampling.
)


def _options(config) -> dict:
  given = config.get('eval') or {}
  given = given.to_dict() if hasattr(given, 'to_dict') else dict(given)
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ConfigError(f'config.eval: unknown keys {unknown}; known: {sorted(DEFAULTS)}')
  o = {**DEFAULTS, **given}
  o['metrics'] = tuple(m.strip() for m in str(o['metrics']).split(',') if m.strip())
  bad = [m for m in o['metrics'] if m not in METRICS]
  if bad or not o['metrics']:
    raise ConfigError(f'config.eval.metrics={",".join(o["metrics"])!r}: choose from {METRICS}')
  return o


def _inception(o):
  """Verified FID Inception params, or a ConfigError before any sampling."""
  if not o['inception_weights']:
    raise ConfigError(
        'config.eval.inception_weights is empty: FID, IS and precision/recall need pytorch-fid\'s '
        'pt_inception-2015-12-05-6726825d.pth (or its .npz from `python -m srdd_jax.tools.convert_inception`). '
        'No FID or IS is computed without them; for offline data sets use config.eval.metrics=proxy')
  from srdd_jax.convert import fid_inception  # pylint: disable=import-outside-toplevel
  try:
    params, info = fid_inception.load_inception(o['inception_weights'])
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f'config.eval.inception_weights: {e}') from e
  if not info.get('verified'):
    raise ConfigError(f'config.eval.inception_weights={o["inception_weights"]!r} are not the published '
                      'FID Inception weights; no FID or IS is computed from them')
  return params, info


def _check_reference(o):
  needs = [m for m in ('fid', 'pr') if m in o['metrics']]
  if not needs:
    return None
  from srdd_jax.evaluation import stats  # pylint: disable=import-outside-toplevel
  if not o['reference']:
    raise ConfigError(f'config.eval.reference is empty: {", ".join(needs)} compare with a reference '
                      '.npz (statistics mu/sigma and/or arr_0 images)')
  try:
    ref = stats.load_reference_batch(o['reference'])
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f'config.eval.reference: {e}') from e
  if 'pr' in o['metrics']:
    with np.load(o['reference']) as z:
      if 'arr_0' not in z.files:
        raise ConfigError(f'config.eval.reference={o["reference"]!r} has no arr_0 images, which '
                          'precision/recall needs')
  return ref


def run_eval(config, workdir: str) -> dict:
  o = _options(config)
  t0 = time.time()
  # Everything that can be wrong is checked before the (long) sampling.
  inception_params, inception_info = (_inception(o) if set(o['metrics']) & set(INCEPTION_METRICS)
                                      else (None, None))
  ref = _check_reference(o)
  if 'proxy' in o['metrics'] and not config.get('data'):
    raise ConfigError('config.data is missing: the proxy metrics compare with held-out images of the '
                      'data set (its test split)')
  if o['samples']:
    images, labels, sampler = _existing_samples(o['samples']) + (None,)
    classes, per = tuple(sorted(set(labels.tolist()))), None
  else:
    sampler, var_params, vae_params = cli.load_models(config)
    nc = sampler.var_config.num_classes
    classes = tuple(int(c) for c in str(o['classes']).split(',') if c.strip()) or tuple(range(nc))
    bad = [k for k in classes if not 0 <= k < nc]
    if bad:
      raise ConfigError(f'config.eval.classes: class {bad[0]} is out of range 0..{nc - 1}')
    per = int(o['num_per_class'])
    if per < 1:
      raise ConfigError(f'config.eval.num_per_class={per} must be >= 1')
    labels = np.repeat(np.asarray(classes, np.int32), per)
    logging.info('eval: sampling %d images (%d classes x %d) for %s', len(labels), len(classes), per,
                 ', '.join(o['metrics']))
    images = cli.generate(sampler, var_params, vae_params, labels, int(o['batch_size']), int(config.seed),
                          key='config.eval.batch_size')
  t_sample = time.time() - t0
  results: dict = {}
  if inception_params is not None:
    results.update(_inception_metrics(o, inception_params, ref, images))
  if 'proxy' in o['metrics']:
    results.update(_proxy_metrics(config, o, images, labels, workdir))
  summary = {
      'metrics': results,
      'protocol': {'num_samples': int(len(labels)), 'classes': list(classes), 'per_class': per,
                   'seed': int(config.seed), 'seeds': f'batch i uses fold_in(PRNGKey({int(config.seed)}), i)',
                   'batch_size': int(o['batch_size']), 'mask': sampler.mask if sampler else None,
                   'sampler': dataclasses.asdict(sampler.config) if sampler else None,
                   'samples': o['samples'] or None,
                   'model': config.model.checkpoint if sampler else None,
                   'tokenizer': config.tokenizer.checkpoint if sampler else None,
                   'reference': o['reference'] or None,
                   'inception_weights_sha256': inception_info['sha256'] if inception_info else None},
      'seconds': {'sampling': round(t_sample, 2), 'total': round(time.time() - t0, 2)},
  }
  if multihost.is_main_process():
    out = os.path.join(workdir, 'eval')
    os.makedirs(out, exist_ok=True)
    if not o['samples']:
      np.savez(os.path.join(out, 'samples.npz'), arr_0=images, arr_1=labels)
    with open(os.path.join(out, 'eval.json'), 'w') as f:
      json.dump(summary, f, indent=1)
    logging.info('eval: %s', json.dumps(results))
  return summary


def _existing_samples(path: str):
  try:
    with np.load(path) as z:
      images, labels = z['arr_0'], (z['arr_1'] if 'arr_1' in z.files else None)
  except (OSError, ValueError, KeyError) as e:
    raise ConfigError(f'config.eval.samples={path!r}: not a samples .npz with arr_0 ({e})') from e
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ConfigError(f'config.eval.samples={path!r}: arr_0 must be uint8 NHWC RGB, got {images.dtype} '
                      f'{images.shape}')
  if labels is None:
    labels = np.zeros(len(images), np.int32)
  return images, np.asarray(labels, np.int32)


def _inception_metrics(o, params, ref, images) -> dict:
  """FID against the reference statistics, IS over 10 splits, precision/recall (k = 3)."""
  # pylint: disable=import-outside-toplevel
  from srdd_jax.evaluation import inception, metrics, stats
  feats = inception.extract(params, images, batch_size=int(o['inception_batch_size']))
  out = {}
  if 'is' in o['metrics']:
    mean, std = metrics.inception_score(feats['logits_unbiased'], splits=10)
    out.update(inception_score=mean, inception_score_std=std)
  if 'fid' in o['metrics']:
    mu_r, sigma_r = stats.reference_statistics(o['reference'], params,
                                               batch_size=int(o['inception_batch_size']))
    mu, sigma = stats.feature_statistics(feats['pool3'])
    out['fid'] = metrics.frechet_distance(mu, sigma, mu_r, sigma_r)
  if 'pr' in o['metrics']:
    real = stats.load_reference_batch(o['reference'], images=True).images
    real_feats = inception.extract(params, real, batch_size=int(o['inception_batch_size']))['pool3']
    out.update(metrics.precision_recall(real_feats, feats['pool3'], k=3))
  del ref  # Checked before sampling; read again here for the statistics or images it holds.
  return out


def _proxy_metrics(config, o, images, labels, workdir) -> dict:
  """fd_<classifier> against held-out real images and class consistency, with the project's own
  classifier of config.data (trained once, cached under WORKDIR/proxy_classifier)."""
  # pylint: disable=import-outside-toplevel
  from srdd_jax.data import pipeline
  from srdd_jax.evaluation import classifier, proxy
  size = int(images.shape[1])
  kwargs = {'epochs': int(o['proxy_epochs'])} if int(o['proxy_epochs']) > 0 else {}
  try:
    clf = classifier.train_or_load(config.data, size, os.path.join(workdir, 'proxy_classifier'),
                                   seed=int(config.seed), **kwargs)
    real, _ = classifier.held_out_images(clf, config.data)
  except pipeline.DataError as e:
    raise ConfigError(str(e)) from e
  real = real[:int(o['proxy_examples'])]
  # Class consistency only means something for a class-conditional model of a labelled data set.
  out = proxy.proxy_metrics(clf, real, images, labels if clf.num_classes > 1 else None)
  out['proxy_classifier'] = clf.key
  out['proxy_real_examples'] = int(len(real))
  return out
