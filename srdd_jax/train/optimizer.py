"""VAR's optimiser (SPEC §8): AdamW with parameter groups, LR and weight-decay schedules, clipping."""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import optax

# Parameters VAR exempts from weight decay besides every 1-D tensor and every bias (class_emb *is*
# decayed). Matched against the '/'-joined Flax path.
_NO_DECAY = re.compile(r'(^|/)(pos_start|pos_1LC|lvl_embed|scale_mul_1H11|ada_gss)(/|$)|bias$')


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  peak_lr: float = 1e-4
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.05
  weight_decay_end: float = -1.0  # -1 = constant; d30 anneals 0.05 -> 0.08 (cosine).
  warmup_steps: int = 0
  total_steps: int = 1
  warmup_start: float = 0.005  # Fraction of the peak at step 0.
  constant_fraction: float = 0.05  # Of the post-warm-up steps, at the peak before the decay.
  final_fraction: float = 0.1  # Of the peak at the end (0.1 d16/d20, 0.01 larger).
  clip_norm: float = 2.0  # <= 0: off.


def peak_lr_for(global_batch: int, base: float = 1e-4) -> float:
  """VAR's rule: base LR (1e-4, 8e-5 for d24 and larger) scaled by global_batch / 256."""
  return base * global_batch / 256


def decay_mask(params):
  """True where a parameter is weight-decayed."""
  def decayed(path, leaf):
    name = '/'.join(str(getattr(p, 'key', p)) for p in path)
    return leaf.ndim > 1 and not _NO_DECAY.search(name)
  return jax.tree_util.tree_map_with_path(decayed, params)


def lr_schedule(c: OptimConfig):
  """Linear warm-up from warmup_start * peak, the peak for `constant_fraction` of the rest, then linear
  decay to `final_fraction` * peak at the last step (VAR's 'lin0' schedule)."""
  def fn(step):
    step = jnp.asarray(step, jnp.float32)
    wp = max(c.warmup_steps, 0)
    warm = c.warmup_start + (1 - c.warmup_start) * step / max(wp, 1)
    passed = (step - wp) / max(c.total_steps - 1 - wp, 1)
    rest = 1 - passed
    decay = jnp.where(passed < c.constant_fraction, 1.0,
                      c.final_fraction + (1 - c.final_fraction) * rest / (1 - c.constant_fraction))
    return c.peak_lr * jnp.where(step < wp, warm, jnp.clip(decay, c.final_fraction, 1.0))
  return fn


def wd_schedule(c: OptimConfig):
  """Cosine from weight_decay to weight_decay_end over training (constant when the end is < 0)."""
  end = c.weight_decay if c.weight_decay_end < 0 else c.weight_decay_end

  def fn(step):
    passed = jnp.asarray(step, jnp.float32) / max(c.total_steps - 1, 1)
    return end + (c.weight_decay - end) * (0.5 + 0.5 * jnp.cos(math.pi * jnp.minimum(passed, 1.0)))
  return fn


def _scheduled_weight_decay(schedule, mask):
  """Adds wd(step) * param to the update of masked parameters (decoupled, as AdamW)."""
  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params):
    wd = schedule(state.count)
    m = mask(params) if callable(mask) else mask
    updates = jax.tree_util.tree_map(lambda u, p, d: u + wd * p if d else u, updates, params, m)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def build_optimizer(c: OptimConfig) -> optax.GradientTransformation:
  parts = []
  if c.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(c.clip_norm))
  parts += [
      optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps),
      _scheduled_weight_decay(wd_schedule(c), decay_mask),
      optax.scale_by_learning_rate(lr_schedule(c)),
  ]
  return optax.chain(*parts)
