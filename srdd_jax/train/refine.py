"""Training the refine stream of masked resampling (SPEC §5): next-scale prediction with part of each
scale's ground-truth tokens revealed, the loss on the hidden ones.

Per example one reveal ratio r for all its scales: 0 with probability `zero_prob` (every token hidden,
the plain next-scale task the first sampling pass asks), else r ~ U(0, max_ratio). Each token is then
revealed independently with probability r: no sort per scale, and the 1x1 and 2x2 scales still see
every count of revealed tokens (a fixed round(r * n) would reveal nothing of them for most r).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from srdd_jax.config import ConfigError
from srdd_jax.train.step import Trainer
from srdd_jax.transformer.config import VARConfig
from srdd_jax.transformer.loss import token_nll


def reveal_mask(rng, batch: int, config: VARConfig, zero_prob: float, max_ratio: float):
  """(batch, L) bool: the tokens revealed to the refine stream (see the module docstring)."""
  k_zero, k_ratio, k_tok = jax.random.split(rng, 3)
  ratio = jax.random.uniform(k_ratio, (batch, 1), maxval=max_ratio)
  ratio = jnp.where(jax.random.uniform(k_zero, (batch, 1)) < zero_prob, 0.0, ratio)
  return jax.random.uniform(k_tok, (batch, config.seq_len)) < ratio


def hidden_cross_entropy(logits, targets, revealed, config: VARConfig, newest_weight=None):
  """Cross-entropy and accuracy over the hidden tokens only: (B, l, V), (B, L), (B, L) bool -> (mean
  loss over the hidden tokens of the batch, the metrics of `cross_entropy_metrics` under the same
  names, so that logging and gradient accumulation work unchanged). With l < L (progressive training:
  the sequence cut after its newest scale) the hidden tokens of those scales count, the newest scale's
  multiplied by `newest_weight`, and the last-scale metrics are -1 as in `cross_entropy_metrics`."""
  logits = logits.astype(jnp.float32)
  l = logits.shape[1]
  targets, revealed = targets[:, :l], revealed[:, :l]
  nll = token_nll(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  hidden = (~revealed).astype(jnp.float32)
  # A batch with every token revealed (possible only for tiny batches) contributes nothing, not NaN.
  mean = lambda x, m: jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)
  if l == config.seq_len:
    last = hidden.at[:, :config.begin_ends[-1][0]].set(0.0)
    loss = mean(nll, hidden)
    last_loss, last_acc = mean(nll, last), mean(correct, last)
  else:
    newest_begin = config.begin_ends[[e for _, e in config.begin_ends].index(l)][0]
    w = jnp.where(jnp.arange(l) >= newest_begin, 1.0 if newest_weight is None else newest_weight, 1.0)
    loss = jnp.sum(nll * hidden * w) / jnp.maximum(jnp.sum(hidden), 1.0)
    last_loss = last_acc = jnp.float32(-1.0)
  return loss, {'loss': loss, 'accuracy': mean(correct, hidden), 'last_scale_loss': last_loss,
                'last_scale_accuracy': last_acc}


def check_reveal(zero_prob: float, max_ratio: float) -> None:
  """The reveal schedule's ranges, checked here only (the config check calls it before loading)."""
  if not 0 <= float(zero_prob) <= 1:
    raise ConfigError(f'config.train.refine_zero_prob={zero_prob}: must be in [0, 1]')
  if not 0 < float(max_ratio) <= 1:
    raise ConfigError(f'config.train.refine_max_ratio={max_ratio}: must be in (0, 1]')


class RefineTrainer(Trainer):
  """The transformer's Trainer with the refine stream trained: the model sees each example's revealed
  ground-truth tokens (others [MASK]) and is scored on the hidden ones. With accumulation each
  micro-batch is normalised by its own count of hidden tokens."""

  def __init__(self, *args, zero_prob: float = 0.1, max_ratio: float = 1.0, **kwargs):
    super().__init__(*args, **kwargs)
    if not self.var_config.refine:
      raise ValueError('RefineTrainer needs a transformer with the refine stream (refine=True)')
    check_reveal(zero_prob, max_ratio)
    self.zero_prob, self.max_ratio = zero_prob, max_ratio

  def reveal(self, rng, batch: int):
    return reveal_mask(rng, batch, self.var_config, self.zero_prob, self.max_ratio)

  def loss(self, params, frozen, labels, ids, rng, stage=None, newest=None):
    # Its own key, folded from the step's: label dropout and drop path draw what the base Trainer does.
    revealed = self.reveal(jax.random.fold_in(rng, 0x5EED), ids.shape[0])
    reveal_ids = jnp.where(revealed, ids, self.var_config.vocab_size).astype(jnp.int32)
    logits, _ = self.logits(params, frozen, labels, ids, rng, stage, reveal_ids=reveal_ids)
    return hidden_cross_entropy(logits, ids, revealed, self.var_config, newest)
