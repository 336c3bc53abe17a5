"""Attention under the two masks of the scale-wise transformer.

`causal` (VAR): a query of scale i sees the keys of scales <= i, a dense L x L masked attention.
`markov` (SRDD): a query of scale i sees only its own scale. It is computed block by block, one
attention per scale over its pn^2 tokens, so its cost grows with sum pn^4, not L^2; no L x L array
is ever built.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def scale_ids(patch_nums: Sequence[int]) -> np.ndarray:
  """(L,) scale index of every position; the start token belongs to scale 0."""
  return np.concatenate([np.full(p * p, i, np.int32) for i, p in enumerate(patch_nums)])


def causal_mask(patch_nums: Sequence[int]) -> np.ndarray:
  """(L, L) bool, True where query scale >= key scale (bidirectional inside a scale)."""
  s = scale_ids(patch_nums)
  return s[:, None] >= s[None, :]


def markov_mask(patch_nums: Sequence[int]) -> np.ndarray:
  """(L, L) bool block-diagonal mask; for tests and reference only, never on the hot path."""
  s = scale_ids(patch_nums)
  return s[:, None] == s[None, :]


def dot_product_attention(q, k, v, scale: float, mask=None, dtype=jnp.float32):
  """q, k, v: (B, L, H, D). Logits and softmax in float32; the matmuls in `dtype`.

  `mask` is None or a bool (Lq, Lk) array; masked logits get -inf like VAR's additive bias.
  """
  logits = jnp.einsum('bqhd,bkhd->bhqk', (q * scale).astype(dtype), k.astype(dtype),
                      preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  w = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', w.astype(dtype), v.astype(dtype),
                    preferred_element_type=jnp.float32)


def markov_attention(q, k, v, scale: float, begin_ends: Sequence[tuple[int, int]], dtype=jnp.float32):
  """Block-diagonal attention: one dense attention per scale, concatenated along the sequence."""
  outs = [dot_product_attention(q[:, b:e], k[:, b:e], v[:, b:e], scale, None, dtype)
          for b, e in begin_ends]
  return jnp.concatenate(outs, axis=1)
