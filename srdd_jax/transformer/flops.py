"""Analytic FLOPs of the transformer: what a train step or a forward pass costs, by mask.

Matmuls only (one multiply-add = 2 FLOPs). Per image and forward:
  per-token weights: depth * (qkv 3C^2 + proj C^2 + fc1 C*M + fc2 M*C) + head C*V over all L tokens,
    plus word_embed Cvae*C over the L - first_l teacher-forcing tokens;
  per-image weights: the AdaLN linears (depth * C*6C, or one shared C*6C) and the head's AdaLN C*2C;
  attention: QK^T and AV, 2 * 2 * C per (query, key) pair and layer, over the pairs the mask keeps
    (causal: a scale's queries over all keys up to its scale's end; markov: sum pn^4).
A train step is 3 forwards (the backward costs twice the forward for every matmul), the '6 N D' rule;
rematerialisation adds recomputation that is not counted (MFU counts useful work only). Left out:
embedding gathers, norms, softmax, the loss, the optimiser and the tokenizer's f_hat inputs (phi
convolutions, ~5e7 FLOPs per image at 256 px, under 0.1%).

`compiled_forward_flops` is the other count: XLA's, of the compiled program, which the analytic one is
checked against.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from srdd_jax.parallel.compile import compiled_stats
from srdd_jax.transformer import attention
from srdd_jax.transformer.config import VARConfig
from srdd_jax.transformer.model import VAR


def attention_pairs(patch_nums: Sequence[int], kind: str) -> int:
  """(query, key) pairs per head and image: 'dense' (L^2), 'causal' (a scale's queries over the keys of
  every scale up to it) or 'markov' (a scale's queries over its own keys, sum pn^4)."""
  n = [p * p for p in patch_nums]
  if kind == 'dense':
    return sum(n) ** 2
  if kind == 'causal':
    return sum(ni * sum(n[:i + 1]) for i, ni in enumerate(n))
  if kind == 'markov':
    return sum(ni * ni for ni in n)
  raise ValueError(f'attention pairs of {kind!r}: expected dense, causal or markov')


def computed_pairs(patch_nums: Sequence[int], mask: str) -> int:
  """(query, key) pairs the training attention computes (`attention.chunks`: small scales grouped, a
  few masked pairs inside a group), per head and image."""
  return sum((qe - qb) * (ke - kb) for qb, qe, kb, ke, _ in attention.chunks(tuple(patch_nums), mask))


def forward_flops(c: VARConfig, mask: str | None = None) -> dict:
  """Forward FLOPs per image: 'dense' (weight matmuls), 'attention' (the pairs the mask keeps),
  'total', and 'attention_computed' (the pairs the chunked attention computes)."""
  C, M, V, L, D = c.width, c.mlp_dim, c.vocab_size, c.seq_len, c.depth
  per_token = D * (4 * C * C + 2 * C * M) + C * V
  per_image = (C * 6 * C if c.shared_aln else D * C * 6 * C) + C * 2 * C
  dense = 2 * per_token * L + 2 * per_image + 2 * c.z_channels * C * (L - c.first_l)
  attn = 4 * C * D * attention_pairs(c.patch_nums, mask or c.mask)
  computed = 4 * C * D * computed_pairs(c.patch_nums, mask or c.mask)
  return {'dense': float(dense), 'attention': float(attn), 'total': float(dense + attn),
          'attention_computed': float(computed), 'weights_per_token': per_token,
          'weights_per_image': per_image}


def train_step_flops(c: VARConfig, batch: int, mask: str | None = None) -> float:
  """Useful FLOPs of one train step on `batch` images (3 x forward)."""
  return 3.0 * batch * forward_flops(c, mask)['total']


def num_params(c: VARConfig) -> int:
  """Parameters of the transformer (weights and biases; embeddings, position and level tables)."""
  C, M, V, L, D = c.width, c.mlp_dim, c.vocab_size, c.seq_len, c.depth
  block = 3 * C * C + 2 * C + C * C + C + C * M + M + M * C + C  # attn (q, v biases) + ffn
  block += c.num_heads if c.attn_l2_norm else 0
  block += 6 * C if c.shared_aln else C * 6 * C + 6 * C
  shared = C * 6 * C + 6 * C if c.shared_aln else 0
  embeds = c.z_channels * C + C + (c.num_classes + 1) * C + c.first_l * C + L * C + c.num_scales * C
  head = C * 2 * C + 2 * C + C * V + V
  return D * block + shared + embeds + head


def compiled_forward_flops(c: VARConfig, batch: int = 1) -> float | None:
  """XLA's FLOP count (cost analysis) of the compiled training forward of `batch` images, lowered on
  abstract parameters, so nothing is allocated. Unlike the analytic count it includes elementwise work
  (norms, softmax, GELU), and XLA:GPU leaves custom calls (cuDNN) out; None where XLA gives no count."""
  model = VAR(c)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  x_in = jax.ShapeDtypeStruct((batch, c.seq_len - 1, c.z_channels), jnp.float32)
  boxed = jax.eval_shape(lambda l, x: model.init(jax.random.PRNGKey(0), l, x), labels, x_in)['params']
  params = nn.meta.unbox(boxed)
  forward = jax.jit(lambda p, l, x: model.apply({'params': p}, l, x))
  return compiled_stats(forward.lower(params, labels, x_in).compile())['xla_flops']
