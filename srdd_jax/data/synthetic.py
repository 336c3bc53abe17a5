"""A deterministic, class-conditional synthetic image set for smoke runs and tests (no files needed).

Image i is a function of (i, its class) alone; the order of an epoch is a permutation drawn from
(seed, epoch), so the batch of any step can be recomputed exactly after a restart.
"""
from __future__ import annotations

import numpy as np


class SyntheticImages:
  def __init__(self, num_examples: int, num_classes: int, size: int):
    if num_examples < 1 or num_classes < 1:
      raise ValueError(f'synthetic data needs examples and classes, got {num_examples}, {num_classes}')
    self.n, self.num_classes, self.size = num_examples, num_classes, size

  def label(self, i: int) -> int:
    return i % self.num_classes

  def image(self, i: int) -> np.ndarray:
    """(size, size, 3) in [-1, 1]: stripes whose angle and colour are set by the class, phase by i."""
    k = self.label(i)
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:self.size, 0:self.size] / self.size
    ang = np.pi * k / self.num_classes
    wave = np.sin(2 * np.pi * (3 + k % 3) * (np.cos(ang) * xx + np.sin(ang) * yy) + rng.uniform(0, 6.3))
    colour = np.array([np.cos(ang), np.sin(ang), np.cos(2 * ang)])
    return (0.8 * wave[..., None] * colour + 0.05 * rng.standard_normal((self.size, self.size, 3))
            ).clip(-1, 1).astype(np.float32)

  def batch(self, seed: int, step: int, global_batch: int):
    """The global batch of `step`: images (B, H, W, 3) and labels (B,)."""
    idx, perms = [], {}
    start = step * global_batch
    for j in range(start, start + global_batch):
      epoch, pos = divmod(j, self.n)
      if epoch not in perms:  # One permutation per epoch touched, not one per example.
        perms[epoch] = np.random.default_rng([seed, epoch]).permutation(self.n)
      idx.append(int(perms[epoch][pos]))
    return (np.stack([self.image(i) for i in idx]), np.array([self.label(i) for i in idx], np.int32))
