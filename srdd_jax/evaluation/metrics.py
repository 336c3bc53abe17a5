"""FID, Inception Score and precision/recall of Inception features (SPEC §9).

FID and IS are float64 NumPy/SciPy on the host. Precision/recall compares every pair of feature
vectors, so it runs blockwise in JAX (float32 with exact matmuls, on whatever backend is there) and never
holds an N x N matrix.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special


# ---------------------------------------------------------------------------------------------------
# Fréchet Inception Distance
# ---------------------------------------------------------------------------------------------------

def _check_stats(mu, sigma, which):
  mu = np.asarray(mu, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
    raise ValueError(f'{which}: expected mu (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}')
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f'{which}: mu or sigma has non-finite values')
  return mu, sigma


def _clip_roundoff(w):
  """Eigenvalues of a PSD matrix below its round-off level (d·eps·max) are zero within the precision
  of the decomposition; their square roots would turn ~1e-16 noise into ~1e-8."""
  tol = w.size * np.finfo(np.float64).eps * max(float(np.max(np.abs(w))), 0.0)
  return np.where(w > tol, w, 0.0)


def psd_sqrt(sigma) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix, by eigendecomposition."""
  sigma = np.asarray(sigma, np.float64)
  w, v = scipy.linalg.eigh((sigma + sigma.T) / 2, driver='evd')
  return (v * np.sqrt(_clip_roundoff(w))) @ v.T


def trace_sqrt_product(sigma1, sigma2) -> float:
  """Tr((Σ1 Σ2)^½) of two covariance matrices, in float64.

  Σ1 Σ2 = Σ1^½ (Σ1^½ Σ2 Σ1^½) Σ1^-½ is similar to the symmetric PSD matrix Σ1^½ Σ2 Σ1^½, so its
  eigenvalues are that matrix's (real, >= 0) and the trace of the principal square root is the sum of
  their square roots. Two symmetric eigendecompositions replace scipy.linalg.sqrtm's Schur form of a
  non-symmetric matrix: faster, never complex, and stable for singular covariances (the identity
  holds for them by continuity).
  """
  s1h = psd_sqrt(sigma1)
  m = s1h @ np.asarray(sigma2, np.float64) @ s1h
  ev = scipy.linalg.eigh((m + m.T) / 2, eigvals_only=True, driver='evd')
  return float(np.sum(np.sqrt(_clip_roundoff(ev))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½): FID when the statistics are pool3 features of the
  published FID Inception weights (see srdd_jax.evaluation.stats)."""
  mu1, sigma1 = _check_stats(mu1, sigma1, 'first statistics')
  mu2, sigma2 = _check_stats(mu2, sigma2, 'second statistics')
  if mu1.shape != mu2.shape:
    raise ValueError(f'statistics of different dimensions: {mu1.size} and {mu2.size}')
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * trace_sqrt_product(sigma1, sigma2))


# ---------------------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------------------

def inception_score(logits, splits: int = 10) -> tuple[float, float]:
  """(mean, std) over `splits` equal parts of exp(E_x KL(p(y|x) ‖ p(y))), float64.

  Parts are [i·N/splits, (i+1)·N/splits) as in OpenAI's improved-GAN code; with 50,000 samples they
  are the 5,000-sample parts of the ADM evaluator. Both use the 1008 logits *without* the fc bias
  (`extract(...)['logits_unbiased']`). A class with p(y|x) = 0 contributes 0 (its limit), not NaN.
  """
  logits = np.asarray(logits)
  if logits.ndim != 2:
    raise ValueError(f'logits must be (N, classes), got shape {logits.shape}')
  n = logits.shape[0]
  if splits < 1 or n < splits:
    raise ValueError(f'need at least one sample per split: {n} samples, {splits} splits')
  scores = []
  for i in range(splits):
    part = np.asarray(logits[i * n // splits:(i + 1) * n // splits], np.float64)
    logp = part - scipy.special.logsumexp(part, axis=1, keepdims=True)
    p = np.exp(logp)
    with np.errstate(divide='ignore', invalid='ignore'):
      log_py = np.log(p.mean(axis=0, keepdims=True))
      kl = np.where(p > 0, p * (logp - log_py), 0.0)
    scores.append(np.exp(kl.sum(axis=1).mean()))
  return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------------------
# Precision and recall (Kynkäänniemi et al. 2019)
# ---------------------------------------------------------------------------------------------------

_HIGHEST = jax.lax.Precision.HIGHEST


def _sq_dists(a, b):
  d = (jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :]
       - 2.0 * jnp.matmul(a, b.T, precision=_HIGHEST))
  return jnp.maximum(d, 0.0)


@functools.partial(jax.jit, static_argnames='k')
def _merge_nearest(best, a, b, row0, col0, k):
  """Running k smallest squared distances of rows `a` to points `b`, excluding each point itself."""
  d = _sq_dists(a, b)
  rows = row0 + jnp.arange(a.shape[0])[:, None]
  cols = col0 + jnp.arange(b.shape[0])[None, :]
  # The point itself is masked by index, so a duplicate still counts as a neighbour at distance 0.
  d = jnp.where(rows == cols, jnp.inf, d)
  neg, _ = jax.lax.top_k(-jnp.concatenate([best, d], axis=1), k)
  return -neg


@jax.jit
def _cover(a, b, radii_a, radii_b):
  """For a block of points a (radii_a) and b (radii_b): does some b cover each a, some a cover each b."""
  d = _sq_dists(a, b)
  a_covered = jnp.any(d <= radii_b[None, :], axis=1)
  b_covered = jnp.any(d <= radii_a[:, None], axis=0)
  return a_covered, b_covered


def _blocks(n, size):
  return [(s, min(s + size, n)) for s in range(0, n, size)]


def knn_radii(features, k: int = 3, *, row_batch: int = 2048, col_batch: int = 8192) -> np.ndarray:
  """Squared distance of each point to its k-th nearest neighbour among the others."""
  x = np.asarray(features, np.float32)
  n = x.shape[0]
  if n <= k:
    raise ValueError(f'k-NN radii with k={k} need more than {k} points, got {n}')
  radii = np.empty(n, np.float32)
  for r0, r1 in _blocks(n, row_batch):
    a = jnp.asarray(x[r0:r1])
    best = jnp.full((r1 - r0, k), jnp.inf, jnp.float32)
    for c0, c1 in _blocks(n, col_batch):
      best = _merge_nearest(best, a, jnp.asarray(x[c0:c1]), r0, c0, k)
    radii[r0:r1] = np.asarray(best[:, k - 1])
  return radii


def precision_recall(real, fake, k: int = 3, *, row_batch: int = 2048, col_batch: int = 8192
                     ) -> dict[str, float]:
  """Improved precision and recall of Kynkäänniemi et al. (2019) with k-NN manifolds.

  Each point's manifold ball has the radius of its k-th nearest neighbour within its own set (the
  point itself excluded). precision = fraction of fake points inside the ball of some real point;
  recall = fraction of real points inside the ball of some fake point (a point on a ball's boundary
  is inside). Distances are computed blockwise (`row_batch` x `col_batch`), so 50k x 50k never needs
  the full matrix.
  """
  real = np.asarray(real, np.float32)
  fake = np.asarray(fake, np.float32)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f'real and fake features must be (N, d) with the same d, got {real.shape} and '
                     f'{fake.shape}')
  r_real = knn_radii(real, k, row_batch=row_batch, col_batch=col_batch)
  r_fake = knn_radii(fake, k, row_batch=row_batch, col_batch=col_batch)
  fake_in_real = np.zeros(len(fake), bool)
  real_in_fake = np.zeros(len(real), bool)
  for f0, f1 in _blocks(len(fake), row_batch):
    a = jnp.asarray(fake[f0:f1])
    for q0, q1 in _blocks(len(real), col_batch):
      fa, ra = _cover(a, jnp.asarray(real[q0:q1]), jnp.asarray(r_fake[f0:f1]), jnp.asarray(r_real[q0:q1]))
      fake_in_real[f0:f1] |= np.asarray(fa)
      real_in_fake[q0:q1] |= np.asarray(ra)
  return {'precision': float(fake_in_real.mean()), 'recall': float(real_in_fake.mean())}
