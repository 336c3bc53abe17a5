"""Code-usage tracking and the restart of dead codes of the shared codebook.

Usage is an exponential moving average, per scale, of the share of that scale's vectors that chose each
code (each row sums to 1). A code is dead when its share of all quantized vectors (scales weighted by
their pn^2 vectors) falls below `threshold / V`, i.e. `threshold` times its share under uniform use.
Dead codes are moved onto encoder features of the current batch, the usual cure for codebook collapse:
a code nobody chooses gets no gradient from the VQ loss and would otherwise stay dead for good.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def update_usage_ema(ema, hits, step, decay: float):
  """The EMA after one more batch of hit counts (S, V); the first step (step 0) sets it directly, so
  early restarts judge codes by what was seen rather than by an arbitrary starting value."""
  freq = hits / jnp.maximum(jnp.sum(hits, axis=-1, keepdims=True), 1.0)
  return jnp.where(step == 0, freq, decay * ema + (1.0 - decay) * freq)


def overall_share(ema, patch_nums: Sequence[int]):
  """(V,) share of all quantized vectors that chose each code: scale k holds B * pn_k^2 of them."""
  w = np.asarray([p * p for p in patch_nums], np.float32)
  return jnp.einsum('s,sv->v', jnp.asarray(w / w.sum()), ema)


def dead_codes(ema, patch_nums: Sequence[int], threshold: float):
  """(V,) bool: codes whose overall EMA share is below threshold / V."""
  v = ema.shape[-1]
  return overall_share(ema, patch_nums) < threshold / v


def restart(codebook, dead, features, rng):
  """Moves each dead code onto a distinct randomly chosen row of `features` (N, C); others stay.

  Rows are drawn without replacement when there are at least V of them, so two restarted codes do not
  land on the same point and tie forever.
  """
  v, n = codebook.shape[0], features.shape[0]
  pick = jax.random.choice(rng, n, (v,), replace=n < v)
  candidates = jnp.take(features, pick, axis=0).astype(codebook.dtype)
  return jnp.where(dead[:, None], candidates, codebook)


def reset_ema_of(ema, dead):
  """Restarted codes get the uniform share 1/V: a grace period, so a code is not restarted again at the
  next round before the EMA has seen whether anyone chooses it."""
  return jnp.where(dead[None, :], 1.0 / ema.shape[-1], ema)
