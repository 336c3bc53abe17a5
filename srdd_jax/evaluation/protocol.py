"""The evaluation protocol's pieces: verified FID Inception weights, reference batches, sample files,
and the metrics of a set of samples (FID/IS/precision-recall, and the offline proxy metrics).

Every function takes the `config.eval` options as a dict `o` (srdd_jax/config.py lists them) and
raises ConfigError naming the key when an input cannot work.
"""
from __future__ import annotations

import json
import zipfile

import numpy as np
from absl import logging

from srdd_jax import files
from srdd_jax.config import ConfigError
from srdd_jax.evaluation import classifier, inception, metrics, proxy, stats
from srdd_jax.evaluation import inception_weights as fid_inception
from srdd_jax.parallel import multihost

METRICS = ('fid', 'is', 'pr', 'proxy')
INCEPTION_METRICS = ('fid', 'is', 'pr')


def _inception_weights_given(o) -> None:
  if not o['inception_weights']:
    raise ConfigError(
        'config.eval.inception_weights is empty: FID, IS and precision/recall need pytorch-fid\'s '
        'pt_inception-2015-12-05-6726825d.pth (or its .npz from `python -m srdd_jax.tools.convert_inception`). '
        'No FID or IS is computed without them; for offline data sets use config.eval.metrics=proxy')


def _reference_given(o) -> bool:
  needs = [m for m in ('fid', 'pr') if m in o['metrics']]
  if needs and not o['reference']:
    raise ConfigError(f'config.eval.reference is empty: {", ".join(needs)} compare with a reference '
                      '.npz (statistics mu/sigma and/or arr_0 images)')
  return bool(needs)


def check_inputs(o, labels_required: bool, num_classes: int | None = None) -> int | None:
  """The files config.eval names, present (and the samples file's header and labels), without reading
  weights or images: what a dry run checks; the runner then reads and verifies them. Returns the number
  of images of the samples file (None: no file given). num_classes: the proxy classifier's (config.data's)
  where known, every label below it."""
  if set(o['metrics']) & set(INCEPTION_METRICS):
    _inception_weights_given(o)
    if not files.isfile(o['inception_weights']):
      raise ConfigError(f'config.eval.inception_weights={o["inception_weights"]!r}: no such file')
  if _reference_given(o) and not files.isfile(o['reference']):
    raise ConfigError(f'config.eval.reference={o["reference"]!r}: no such file')
  return check_samples(o['samples'], labels_required, num_classes) if o['samples'] else None


def verified_inception(o):
  """Verified FID Inception params, or a ConfigError before any sampling."""
  _inception_weights_given(o)
  try:
    params, info = fid_inception.load_inception(o['inception_weights'])
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f'config.eval.inception_weights: {e}') from e
  if not info.get('verified'):
    raise ConfigError(f'config.eval.inception_weights={o["inception_weights"]!r} are not the published '
                      'FID Inception weights; no FID or IS is computed from them')
  return params, info


def check_reference(o):
  if not _reference_given(o):
    return None
  try:
    ref = stats.load_reference_batch(o['reference'])
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f'config.eval.reference: {e}') from e
  if 'pr' in o['metrics']:
    with files.np_load(o['reference']) as z:
      if 'arr_0' not in z.files:
        raise ConfigError(f'config.eval.reference={o["reference"]!r} has no arr_0 images, which '
                          'precision/recall needs')
  return ref


def _samples_error(path: str, why: str) -> ConfigError:
  return ConfigError(f'config.eval.samples={path!r}: {why}')


def _checked_labels(path: str, labels, n: int, required: bool, num_classes: int | None = None):
  """arr_1 as int32 class labels, one per image, or None where none are given and none are `required`
  (the proxy metrics' class consistency compares each sample's label with the classifier's class: scoring
  missing labels as class 0, or float labels truncated, gave a wrong number without a word). num_classes:
  the classifier's number of classes where known (None: checked by the classifier when it scores them)."""
  if labels is None:
    if required:
      raise _samples_error(path, 'has no arr_1 (the class labels) and the proxy metrics\' class consistency needs '
                                 'them: save np.savez(path, arr_0=images, arr_1=labels) with integer labels, or '
                                 'leave proxy out of config.eval.metrics')
    return None
  labels = np.asarray(labels)
  if labels.shape != (n,):
    raise _samples_error(path, f'arr_1 holds {labels.shape} labels for {n} images; one class label per image')
  if labels.dtype.kind == 'f':
    whole = np.isfinite(labels) & (labels == np.round(labels))
    if not whole.all():
      i = int(np.flatnonzero(~whole)[0])
      raise _samples_error(path, f'arr_1[{i}] = {float(labels[i]):g} is not a whole number: class labels are integers')
  elif labels.dtype.kind not in 'iu':
    raise _samples_error(path, f'arr_1 holds {labels.dtype} values; class labels are integers')
  if n and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
    raise _samples_error(path, f'arr_1 holds labels in [{labels.min()}, {labels.max()}]; class labels are >= 0')
  if n and num_classes is not None and labels.max() >= num_classes:
    i = int(np.flatnonzero(labels >= num_classes)[0])
    raise _samples_error(path, f'arr_1[{i}] = {int(labels[i])} is not a class of config.data, whose proxy classifier '
                               f'has {num_classes} classes (0..{num_classes - 1})')
  return labels.astype(np.int32)


def _check_images(path: str, shape, dtype) -> None:
  if np.dtype(dtype) != np.uint8 or len(shape) != 4 or shape[-1] != 3:
    raise _samples_error(path, f'arr_0 must be uint8 NHWC RGB, got {np.dtype(dtype)} {tuple(shape)}')


def _open_npz(path: str):
  if not path or not files.isfile(path):
    raise _samples_error(path, 'no such file')
  try:
    return files.np_load(path)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # Truncated: BadZipFile.
    raise _samples_error(path, f'not a samples .npz with arr_0 ({type(e).__name__}: {e})') from None


def _as_npz(path: str, z):
  if not isinstance(z, np.lib.npyio.NpzFile):  # np.load of an .npy file gives its one array.
    raise _samples_error(path, 'is a single array (.npy), not a samples .npz: save np.savez(path, arr_0=images, '
                               'arr_1=labels)')
  if 'arr_0' not in z.files:
    z.close()
    raise _samples_error(path, f'not a samples .npz with arr_0 (it holds {sorted(z.files)})')
  return z


def check_samples(path: str, labels_required: bool, num_classes: int | None = None) -> int:
  """The samples file config.eval.samples names, checked as `load_samples` reads it but without reading
  the images: their header (shape, dtype) and the labels (what a dry run checks). Returns the number of
  images."""
  with _as_npz(path, _open_npz(path)) as z:
    try:
      with z.zip.open('arr_0.npy') as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                       np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(f)
      labels = z['arr_1'] if 'arr_1' in z.files else None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
      raise _samples_error(path, f'not a samples .npz with arr_0 ({type(e).__name__}: {e})') from None
  _check_images(path, shape, dtype)
  _checked_labels(path, labels, shape[0], labels_required, num_classes)
  return int(shape[0])


def load_samples(path: str, labels_required: bool = True):
  """(images uint8 NHWC, int32 labels or None) of a samples .npz (arr_0, arr_1); labels are None only
  where none are given and none are `labels_required`."""
  with _as_npz(path, _open_npz(path)) as z:
    try:
      images, labels = z['arr_0'], (z['arr_1'] if 'arr_1' in z.files else None)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      raise _samples_error(path, f'not a samples .npz with arr_0 ({type(e).__name__}: {e})') from None
  _check_images(path, images.shape, images.dtype)
  return images, _checked_labels(path, labels, len(images), labels_required)


def inception_metrics(o, params, ref, images) -> dict:
  """FID against the reference statistics, IS over 10 splits, precision/recall (k = 3)."""
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


REAL_FEATURES = 'real_features_{split}_{examples}.npz'  # In the classifier's cache entry.


def real_features(clf, data_config, split: str, examples: int, entry_dir: str) -> tuple[np.ndarray, bool]:
  """(features, from the cache) of the classifier `clf` for the first `examples` real images of its
  `split` ('test' or 'train'). Read from its cache entry `entry_dir` (REAL_FEATURES) when a run before
  computed them for this very classifier (the file records its key, the SHA-256 of its parameters, the
  split and the data it names, checked on reading); else computed (loading and preprocessing the images
  is most of it: 10,000 Fashion-MNIST images on every evaluation) and written there for the next run."""
  r = clf.info['request']
  identity = {'classifier': clf.key, 'params_sha256': clf.info.get('params_sha256'), 'split': split,
              'split_name': r['train_split' if split == 'train' else 'test_split'], 'data': r['data'],
              'examples': int(examples)}
  path = files.join(entry_dir, REAL_FEATURES.format(split=split, examples=int(examples)))
  if identity['params_sha256'] and files.isfile(path):
    try:
      with files.np_load(path) as z:
        recorded, feats = json.loads(str(z['identity'])), z['features']
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      recorded, feats = None, None
      logging.warning('%s is unreadable (%s: %s): the features are computed again', path, type(e).__name__, e)
    if recorded == identity and feats.ndim == 2 and feats.shape[1] == clf.feature_dim:
      return feats, True
    if recorded is not None:
      logging.warning('%s holds the features of another classifier or split: computed again', path)
  real, _, _ = classifier.load_split(data_config, r['image_size'], split, train_split=r['train_split'],
                                     test_split=r['test_split'])
  feats = proxy.features(clf, real[:int(examples)], what=f'{split} real images')
  # Process 0 writes, atomically (files.save_npz); a classifier whose parameters have no recorded hash (not
  # cached itself) caches nothing.
  if identity['params_sha256'] and multihost.is_main_process():
    files.save_npz(path, features=feats, identity=np.asarray(json.dumps(identity, sort_keys=True)))
  return feats, False


class ProxyScorer:
  """The proxy metrics of many sets of samples against one classifier: the project's classifier of
  config.data (trained once, cached under WORKDIR/proxy_classifier) and the real images' features (computed
  once per classifier and split, cached beside it: `real_features`), each loaded once.

  seed: the classifier's (default config.seed); a study that compares runs of several seeds scores them
  all with one classifier. split: the real images, 'test' (held out: the reported metrics) or 'train'
  (choosing a setting without looking at the test split). precision_recall: also improved precision and
  recall against the same real images (their features kept; a study's precision/recall view)."""

  def __init__(self, config, o, workdir: str, *, seed: int | None = None, precision_recall: bool = False):
    self.config, self.o, self.workdir = config, o, workdir
    self.cache_dir = files.join(workdir, 'proxy_classifier')
    self.seed = int(config.seed) if seed is None else int(seed)
    self.clf = None
    self.real_stats = {}  # split -> ((mu, sigma), number of real images, their features)
    self.precision_recall = precision_recall

  def classifier(self, size: int):
    if self.clf is None:
      kwargs = {'epochs': int(self.o['proxy_epochs'])} if int(self.o['proxy_epochs']) > 0 else {}
      self.clf = classifier.train_or_load(self.config.data, size, self.cache_dir, seed=self.seed, **kwargs)
    return self.clf

  def reals(self, size: int, split: str = 'test'):
    """((mu, sigma) of the classifier's features, count, features) of the first proxy_examples real images
    of `split`."""
    if split not in self.real_stats:
      clf = self.classifier(size)
      feats, _ = real_features(clf, self.config.data, split, int(self.o['proxy_examples']),
                               files.join(self.cache_dir, clf.key))
      self.real_stats[split] = (stats.feature_statistics(feats), len(feats), feats)
    return self.real_stats[split]

  def __call__(self, images, labels, split: str = 'test') -> dict:
    """fd_<classifier> against the real images of `split` and class consistency (for a class-conditional
    model of a labelled data set: the only case where it means something), with the classifier's key and
    the number of real images."""
    size = int(images.shape[1])
    clf = self.classifier(size)
    try:
      stats_, n_real, feats = self.reals(size, split)
      out = proxy.proxy_metrics(clf, None, images, labels if clf.num_classes > 1 else None, real_stats=stats_,
                                real_features=feats if self.precision_recall else None)
    except ValueError as e:
      where = f'config.eval.samples={self.o["samples"]!r}' if self.o['samples'] else 'the samples'
      raise ConfigError(f'{where}: {e} (the classes of config.data)') from e
    out['proxy_classifier'] = clf.key
    out['proxy_real_examples'] = int(n_real)
    return out


def proxy_metrics(config, o, images, labels, workdir) -> dict:
  """fd_<classifier> against held-out real images and class consistency, with the project's own
  classifier of config.data (trained once, cached under WORKDIR/proxy_classifier)."""
  return ProxyScorer(config, o, workdir)(images, labels)
