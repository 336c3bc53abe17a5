"""Reference statistics: mean and covariance of pool3 features, saved and read as `.npz`.

Files hold `mu` (2048,) and `sigma` (2048, 2048) in float64, the layout pytorch-fid and OpenAI's
evaluator use, plus a `meta` JSON entry when written here (sample count, feature, and the SHA-256 of
the Inception weights that produced them). `load_reference_batch` also reads OpenAI's reference
batches (`VIRTUAL_imagenet256_labeled.npz`, ...): `arr_0` uint8 NHWC images and, in most of them,
precomputed `mu`/`sigma` (their spatial `mu_s`/`sigma_s` are not used).

OpenAI's precomputed `mu`/`sigma` come from their TensorFlow evaluator, which resizes and scales the
images inside the TF graph rather than as pytorch-fid does, so an FID against them can differ slightly
from one against statistics computed here from the same file's `arr_0`. Compare numbers only when
they were computed the same way, and say which way.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable

import numpy as np

from srdd_jax import files
from srdd_jax.evaluation import inception

STATS_KIND = 'fid_statistics'


class StatsAccumulator:
  """Streaming float64 mean and covariance (ddof=1, as np.cov, pytorch-fid and the ADM evaluator).

  Sums are taken about the first batch's mean, so the covariance does not suffer the cancellation
  of E[xxᵀ] − μμᵀ when features are far from zero.
  """

  def __init__(self):
    self.count = 0
    self._shift = None
    self._sum = None
    self._outer = None

  def update(self, features) -> 'StatsAccumulator':
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
      raise ValueError(f'features must be (N, d), got shape {x.shape}')
    if self._shift is None:
      self._shift = x.mean(axis=0)
      self._sum = np.zeros(x.shape[1])
      self._outer = np.zeros((x.shape[1], x.shape[1]))
    elif x.shape[1] != self._shift.size:
      raise ValueError(f'features of dimension {x.shape[1]} after {self._shift.size}')
    y = x - self._shift
    self._sum += y.sum(axis=0)
    self._outer += y.T @ y
    self.count += x.shape[0]
    return self

  def finalize(self) -> tuple[np.ndarray, np.ndarray]:
    if self.count < 2:
      raise ValueError(f'a covariance needs at least 2 samples, got {self.count}')
    m = self._sum / self.count
    sigma = (self._outer - self.count * np.outer(m, m)) / (self.count - 1)
    return self._shift + m, (sigma + sigma.T) / 2


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of an (N, d) feature array."""
  return StatsAccumulator().update(features).finalize()


def statistics_from_images(params, batches: Iterable[Any], *, batch_size: int = 64,
                           feature: str = 'pool3') -> tuple[np.ndarray, np.ndarray, int]:
  """(mu, sigma, count) of Inception features of NHWC image batches (uint8, or float in [0, 1]).

  `batches` is an array of images or any iterable of such arrays (a data pipeline, the chunks of a
  large file), so the dataset never has to fit in memory at once.
  """
  if hasattr(batches, 'shape'):
    batches = [batches]
  acc = StatsAccumulator()
  for images in batches:
    acc.update(inception.extract(params, images, batch_size=batch_size)[feature])
  mu, sigma = acc.finalize()
  return mu, sigma, acc.count


def save_statistics(path: str | os.PathLike, mu, sigma, *, count: int, weights_sha256: str | None,
                    source: str = '', feature: str = 'pool3', overwrite: bool = False) -> str:
  """Writes `mu`, `sigma` (float64) and `meta` to `path` (.npz)."""
  path = os.fspath(path)
  if not path.endswith('.npz'):
    raise ValueError(f'statistics are written as .npz; got {path}')
  if files.exists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass overwrite=True to replace it')
  mu = np.asarray(mu, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
    raise ValueError(f'expected mu (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}')
  meta = {'kind': STATS_KIND, 'count': int(count), 'feature': feature, 'source': source,
          'inception_weights_sha256': weights_sha256}
  files.save_npz(path, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta)))
  return path


@dataclasses.dataclass
class ReferenceBatch:
  """What a reference `.npz` holds: precomputed statistics, images, or both."""
  path: str
  mu: np.ndarray | None = None
  sigma: np.ndarray | None = None
  images: np.ndarray | None = None
  meta: dict | None = None

  @property
  def has_statistics(self) -> bool:
    return self.mu is not None


def load_reference_batch(path: str | os.PathLike, *, images: bool = False) -> ReferenceBatch:
  """Reads `mu`/`sigma` (if present) and, with `images=True`, `arr_0` of a reference `.npz`.

  Accepts files written by `save_statistics`, pytorch-fid's statistics (`mu`, `sigma`) and OpenAI's
  reference batches. Raises ValueError naming the file and the entry that is wrong.
  """
  path = os.fspath(path)
  if not files.isfile(path):
    raise FileNotFoundError(f'reference statistics file not found: {path}')
  with files.np_load(path, allow_pickle=False) as z:
    entries = set(z.files)
    out = ReferenceBatch(path)
    if 'meta' in entries:
      try:
        out.meta = json.loads(str(z['meta']))
      except json.JSONDecodeError:
        out.meta = None
    if ('mu' in entries) != ('sigma' in entries):
      raise ValueError(f'{path}: has only one of `mu` and `sigma`')
    if 'mu' in entries:
      mu, sigma = np.asarray(z['mu'], np.float64), np.asarray(z['sigma'], np.float64)
      if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f'{path}: `mu` {mu.shape} and `sigma` {sigma.shape} are not (d,) and (d, d)')
      out.mu, out.sigma = mu, sigma
    if images:
      if 'arr_0' not in entries:
        raise ValueError(f'{path}: no `arr_0` images (entries: {sorted(entries)})')
      arr = z['arr_0']
      if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f'{path}: `arr_0` must be uint8 NHWC RGB images, got {arr.dtype} {arr.shape}')
      out.images = arr
    if out.mu is None and 'arr_0' not in entries:
      raise ValueError(f'{path}: neither `mu`/`sigma` nor `arr_0` images (entries: {sorted(entries)})')
  return out


def reference_statistics(path: str | os.PathLike, params=None, *, batch_size: int = 64
                         ) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of a reference `.npz`: its precomputed statistics, else those of its `arr_0` images
  (which needs the Inception `params`)."""
  ref = load_reference_batch(path)
  if ref.has_statistics:
    return ref.mu, ref.sigma
  if params is None:
    raise ValueError(f'{path} holds images only; pass the Inception params to compute its statistics')
  images = load_reference_batch(path, images=True).images
  chunk = 50 * batch_size  # Features of a chunk at a time; the images are already in memory.
  mu, sigma, _ = statistics_from_images(
      params, (images[i:i + chunk] for i in range(0, len(images), chunk)), batch_size=batch_size)
  return mu, sigma
