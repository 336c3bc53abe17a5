"""The training objective: mean cross-entropy over all L tokens, with accuracy overall and last scale.

With the deterministic forward process of the discrete-diffusion reading (SPEC §3) the ELBO reduces to
this per-scale cross-entropy, so training is VAR's loss under the chosen mask.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax.transformer.config import VARConfig


def cross_entropy_metrics(logits, targets, config: VARConfig, active_scales=None):
  """logits (B, L, V), targets (B, L) int -> (mean loss, metrics dict of scalars).

  `active_scales` (a traced int, for progressive growth): only the tokens of the first that many scales
  count in the loss and the accuracy; the last-scale metrics are always those of the final scale.
  """
  logits = logits.astype(jnp.float32)
  # logsumexp minus the target's logit, picked by a comparison with an iota rather than a gather: the
  # same values, and a backward that is one fused elementwise pass (softmax - one-hot) instead of a
  # scatter into a zero-filled (B, L, V) array.
  hit = jnp.arange(logits.shape[-1]) == targets[..., None].astype(jnp.int32)
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  b, e = config.begin_ends[-1]
  if active_scales is None:
    loss, accuracy = jnp.mean(nll), jnp.mean(correct)
  else:
    scale_of_token = np.repeat(np.arange(config.num_scales), [pn * pn for pn in config.patch_nums])
    w = (jnp.asarray(scale_of_token) < active_scales).astype(jnp.float32)[None]
    denom = jnp.sum(w) * nll.shape[0]
    loss, accuracy = jnp.sum(nll * w) / denom, jnp.sum(correct * w) / denom
  metrics = {
      'loss': loss,
      'accuracy': accuracy,
      'last_scale_loss': jnp.mean(nll[:, b:e]),
      'last_scale_accuracy': jnp.mean(correct[:, b:e]),
  }
  return loss, metrics
