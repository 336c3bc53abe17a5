"""The optimisers: AdamW with decoupled, masked weight decay, learning-rate schedules and clipping.

The transformer uses VAR's (SPEC §8): the 'lin0' LR schedule, a cosine weight-decay schedule and VAR's
no-decay groups. The tokenizer uses a warm-up then constant or cosine LR, a constant weight decay, and
never decays its codebook. Both are `build_optimizer` with their own schedule and mask.""" 
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


def _masked_weight_decay(rate: float, mask):
  """Adds rate * param to the update where mask(path, param) (decoupled, as AdamW). Stateless, and the
  mask is evaluated at update time on the unboxed parameters, so `init` can take boxed ones."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params):
    updates = jax.tree_util.tree_map_with_path(lambda path, u, p: u + rate * p if mask(path, p) else u,
                                               updates, params)
    return updates, state

  return optax.GradientTransformation(init, update)


def build_optimizer(lr, *, b1: float, b2: float, eps: float, clip_norm: float, weight_decay,
                    decay) -> optax.GradientTransformation:
  """Clip (when clip_norm > 0) -> Adam -> decoupled weight decay -> learning rate `lr(step)`.

  `weight_decay` is a schedule wd(step) (its step counter lives in the optimizer state) or a constant
  (no state; 0 adds nothing). `decay` says which parameters decay: a tree function of the params
  (schedules) or a (path, leaf) predicate (constants)."""
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
  parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
  if callable(weight_decay):
    parts.append(_scheduled_weight_decay(weight_decay, decay))
  elif weight_decay > 0:
    parts.append(_masked_weight_decay(float(weight_decay), decay))
  parts.append(optax.scale_by_learning_rate(lr))
  return optax.chain(*parts)


def var_optimizer(c: OptimConfig) -> optax.GradientTransformation:
  """VAR's AdamW for the transformer."""
  return build_optimizer(lr_schedule(c), b1=c.b1, b2=c.b2, eps=c.eps, clip_norm=c.clip_norm,
                         weight_decay=wd_schedule(c), decay=decay_mask)


def warmup_schedule(peak: float, warmup_steps: int, total_steps: int, kind: str = 'constant',
                    final_fraction: float = 0.1):
  """Linear warm-up to `peak` (step 0 already moves), then constant or cosine to peak * final_fraction."""
  def fn(step):
    step = jnp.asarray(step, jnp.float32)
    wp = warmup_steps
    warm = (step + 1) / max(wp, 1)
    if kind == 'constant':
      after = jnp.ones_like(step)
    else:
      t = jnp.clip((step - wp) / max(total_steps - wp, 1), 0.0, 1.0)
      after = final_fraction + (1 - final_fraction) * 0.5 * (1 + jnp.cos(math.pi * t))
    return peak * jnp.where(step < wp, warm, after)
  return fn
