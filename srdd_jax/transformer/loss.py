"""The training objective: mean cross-entropy over all L tokens, with accuracy overall and last scale.

With the deterministic forward process of the discrete-diffusion reading (SPEC §3) the ELBO reduces to
this per-scale cross-entropy, so training is VAR's loss under the chosen mask.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax.transformer.config import VARConfig


def token_nll(logits, targets):
  """Per-token cross-entropy (..., V), (...) -> (...), float32: logsumexp minus the target's logit,
  picked by a comparison with an iota rather than a gather: the same values, and a backward that is one
  fused elementwise pass (softmax - one-hot) instead of a scatter into a zero-filled (B, L, V) array."""
  logits = logits.astype(jnp.float32)
  hit = jnp.arange(logits.shape[-1]) == targets[..., None].astype(jnp.int32)
  return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)


def cross_entropy_metrics(logits, targets, config: VARConfig, newest_weight=None):
  """logits (B, l, V), targets (B, L) int -> (loss, metrics dict of scalars).

  VAR's loss: every token weighs 1/L, so with all L tokens it is the mean cross-entropy. With fewer
  (l < L: progressive training, the sequence cut after its newest scale) the weights stay 1/L, not
  renormalised over the l tokens, and the newest scale's are multiplied by `newest_weight` (VAR's
  prog_wp, may be traced); accuracy is over the l tokens, and the last-scale metrics are -1, as VAR
  logs them, until the last scale is trained.
  """
  logits = logits.astype(jnp.float32)
  l = logits.shape[1]
  targets = targets[:, :l]
  nll = token_nll(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  accuracy = jnp.mean(correct)
  if l == config.seq_len:
    b, e = config.begin_ends[-1]
    loss = jnp.mean(nll)
    last_loss, last_acc = jnp.mean(nll[:, b:e]), jnp.mean(correct[:, b:e])
  else:
    ends = [e for _, e in config.begin_ends]
    if l not in ends:
      raise ValueError(f'{l} logits do not end at a scale boundary {ends}')
    newest_begin = config.begin_ends[ends.index(l)][0]
    newest = jnp.asarray(np.arange(l) >= newest_begin)
    w = jnp.where(newest, 1.0 if newest_weight is None else newest_weight, 1.0) / config.seq_len
    loss = jnp.mean(jnp.sum(nll * w, axis=-1))
    last_loss = last_acc = jnp.float32(-1.0)
  metrics = {
      'loss': loss,
      'accuracy': accuracy,
      'last_scale_loss': last_loss,
      'last_scale_accuracy': last_acc,
  }
  return loss, metrics
