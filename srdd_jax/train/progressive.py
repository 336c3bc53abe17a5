"""VAR's progressive training: the scales trained grow from a few coarse ones to all of them.

A transcription of the official schedule (train.py and trainer.py of VAR): during the learning-rate
warm-up the first `start_scales` scales are trained; then the newest scale index grows linearly
(rounded) until `full_step`, from which every scale is trained. The sequence is cut after the newest
scale, so an early stage costs what a shorter model costs. The loss keeps VAR's weight 1/L on every
token (so a stage's loss is not renormalised over its fewer tokens), and on entering a stage other than
the first and the last, the newest scale's weight ramps from 0.01 to 1 over `ramp_steps`.

The schedule is a function of the step alone (VAR keeps counters in its trainer state), so a resumed
run trains exactly what an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Progressive:
  start_scales: int  # VAR's pg0 + 1.
  full_step: int  # VAR's max_it * pg: every scale is trained from this step on.
  warmup_steps: int  # VAR's wp_it, the learning-rate warm-up: the first stage lasts at least this long.
  ramp_steps: int  # VAR's pgwp * iters_train.
  num_scales: int

  def __post_init__(self):
    if not 1 <= self.start_scales <= self.num_scales:
      raise ValueError(f'progressive start_scales={self.start_scales}: must be in 1..{self.num_scales}')
    if self.full_step <= self.warmup_steps:
      raise ValueError(f'progressive full_step={self.full_step} must come after the learning-rate warm-up '
                       f'({self.warmup_steps} steps): the scales grow between the two')
    if self.ramp_steps < 1:
      raise ValueError(f'progressive ramp_steps={self.ramp_steps}: must be >= 1')

  def newest_scale(self, step: int) -> int:
    """VAR's prog_si at global step `step` (0-based index of the newest scale trained)."""
    first, last = self.start_scales - 1, self.num_scales - 1
    if step <= self.warmup_steps:
      return first
    if step >= self.full_step:
      return last
    progress = min(max((step - self.warmup_steps) / (self.full_step - self.warmup_steps), 0), 1)
    return first + round(progress * (last - first))

  def stage_start(self, si: int) -> int:
    """The first step whose newest scale is `si` (the stage index is non-decreasing in the step)."""
    lo, hi = 0, self.full_step
    while lo < hi:
      mid = (lo + hi) // 2
      if self.newest_scale(mid) >= si:
        hi = mid
      else:
        lo = mid + 1
    return lo

  def stage(self, step: int) -> tuple[int, int, int]:
    """The static key of the program that trains `step`: (active scales, stage start, ramp steps); ramp
    steps 0 means the newest scale has full weight (the first stage, whose warm-up is the learning
    rate's, and the last, where VAR trains as without progression)."""
    si = self.newest_scale(step)
    if si in (self.start_scales - 1, self.num_scales - 1):
      return si + 1, 0, 0
    return si + 1, self.stage_start(si), self.ramp_steps


def newest_weight(stage: tuple[int, int, int], step):
  """VAR's prog_wp: max(min(steps in the stage / ramp, 1), 0.01); 1 without a ramp. `step` may be traced."""
  _, start, ramp = stage
  if ramp == 0:
    return jnp.float32(1.0)
  return jnp.clip((step - start + 1).astype(jnp.float32) / ramp, 0.01, 1.0)
