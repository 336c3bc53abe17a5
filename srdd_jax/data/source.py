"""The order of examples and the batch of any step: a pure function of (seed, step), sliced per process.

The examples form an infinite sequence, one permutation of the dataset per epoch drawn from (seed, epoch);
the global batch of step s is positions s*B .. (s+1)*B-1 of it. The random crop and flip of an example
depend on (seed, step, position in the global batch) only, never on which rows a process asked for, so
processes taking disjoint rows together see exactly the batch one process would see, and a run resumed at
step s sees the batches it would have seen.

Unreadable examples (a corrupt or vanished file, bytes that do not decode) never stop a run: the position
takes the next readable example of the same epoch's permutation (wrapping around), keeping its own crop and
flip. Each bad example is logged once at warning level with its name and counted in `skipped`. Which
examples are bad is a property of the files, so the batches stay a function of (seed, step) for a given set
of files; the set of known-bad examples is only a cache and the order it is discovered in does not matter.
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
from collections.abc import Iterator

import numpy as np
from absl import logging

from srdd_jax.config import ConfigError
from srdd_jax.data import preprocess as pp

# Appended to the augmentation seed so it can never equal a permutation seed [seed, epoch] (numpy's
# SeedSequence pads with zeros, so a zero tag would not be enough).
AUG_TAG = 0xA06


class DataError(ConfigError):
  """A data config or dataset that cannot work; the message names the config key and the path."""


def augmentation_draws(seed: int, step: int, position: int) -> np.ndarray:
  """Three uniforms of (seed, step, position in the global batch): crop u, crop v, flip (< 0.5)."""
  return np.random.default_rng([seed, step, position, AUG_TAG]).random(3)


def row_positions(global_batch: int, rows=None) -> np.ndarray:
  """Positions in the global batch that `rows` names: None (all of it), a slice, or a sequence of
  disjoint increasing slices (a process's spans on a mesh laid out by the interconnect, where a host can
  hold blocks 0, 1, 4 and 5 of the batch). The loaded rows are their concatenation, in this order."""
  if global_batch < 1:
    raise DataError(f'global_batch must be >= 1, got {global_batch}')
  spans = [slice(0, global_batch)] if rows is None else [rows] if isinstance(rows, slice) else list(rows)
  out, end = [], 0
  for r in spans:
    start = 0 if r.start is None else r.start
    stop = global_batch if r.stop is None else r.stop
    if r.step not in (None, 1) or not end <= start < stop <= global_batch:
      raise DataError(f'rows={rows} must be non-empty, increasing, disjoint contiguous slices of '
                      f'[0, {global_batch}) (the global batch)')
    out.append(np.arange(start, stop))
    end = stop
  if not out:
    raise DataError(f'rows={rows} names no row of the global batch')
  return np.concatenate(out)


class Unreadable(Exception):
  """Raised by a source's `load` for an example whose bytes cannot be read or decoded."""


class ImageSource:
  """Base class: subclasses set the sizes and implement `load(index) -> (image, label)` and `name(index)`.

  `load` returns a PIL image of any mode or a uint8 array, and raises `Unreadable` for a bad example.
  """

  def __init__(self, *, num_examples: int, num_classes: int, image_size: int, description: str,
               resize_ratio: float = 1.125, random_crop: bool = False, flip: bool = False, workers: int = 0):
    if num_examples < 1:
      raise DataError(f'{description}: the dataset is empty')
    self.num_examples, self.num_classes, self.image_size = int(num_examples), int(num_classes), int(image_size)
    self.description = description
    self.resize_ratio, self.random_crop, self.flip = float(resize_ratio), bool(random_crop), bool(flip)
    if int(workers) < 0:
      raise DataError(f'config.data.workers={workers} must be >= 0 (0: two threads per core)')
    self.workers = int(workers)
    self._lock = threading.Lock()
    self._perms: dict[tuple[int, int], np.ndarray] = {}
    self._bad: set[int] = set()

  # --- what a subclass provides ---
  def load(self, index: int):
    raise NotImplementedError

  def name(self, index: int) -> str:
    return f'example {index}'

  # --- order ---
  @property
  def skipped(self) -> int:
    """How many distinct unreadable examples were met (and replaced) so far in this process."""
    return len(self._bad)

  def permutation(self, seed: int, epoch: int) -> np.ndarray:
    key = (int(seed), int(epoch))
    with self._lock:
      perm = self._perms.get(key)
    if perm is None:
      perm = np.random.default_rng([key[0], key[1]]).permutation(self.num_examples)
      with self._lock:
        if len(self._perms) >= 4:  # A batch touches at most a few consecutive epochs.
          self._perms.pop(next(iter(self._perms)))
        self._perms[key] = perm
    return perm

  def mark_bad(self, index: int, reason: str):
    with self._lock:
      new = index not in self._bad
      self._bad.add(index)
      count = len(self._bad)
    if new:
      logging.warning('skipping unreadable %s (%s); %d skipped so far in %s', self.name(index), reason, count,
                      self.description)

  # --- one example ---
  def decode(self, index: int, seed: int, step: int, position: int):
    """The preprocessed pixels (uint8) of example `index` with the crop and flip of (seed, step, position)."""
    image, label = self.load(index)
    uv, flip = None, False
    if self.random_crop or self.flip:
      r = augmentation_draws(seed, step, position)
      uv = (float(r[0]), float(r[1])) if self.random_crop else None
      flip = self.flip and r[2] < 0.5
    return pp.pixels(image, self.image_size, self.resize_ratio, uv, flip), label

  def example(self, seed: int, step: int, position: int, global_batch: int):
    """(pixels, label) at `position` of the global batch of `step`, unreadable examples replaced."""
    if seed < 0 or step < 0:
      raise DataError(f'seed and step must be >= 0, got seed={seed}, step={step}')
    epoch, k = divmod(step * global_batch + position, self.num_examples)
    perm = self.permutation(seed, epoch)
    for t in range(self.num_examples):
      index = int(perm[(k + t) % self.num_examples])
      if index in self._bad:
        continue
      try:
        image, label = self.decode(index, seed, step, position)
      except Unreadable as e:
        self.mark_bad(index, str(e))
        continue
      return image, np.int32(label)
    raise DataError(f'{self.description}: none of the {self.num_examples} examples is readable')

  # --- batches ---
  def batch(self, seed: int, step: int, global_batch: int, rows=None, raw: bool = False):
    """The rows `rows` (None: all; a slice; or a process's spans, see `row_positions`) of the global batch
    of `step`: images (n, S, S, 3) float32 in [-1, 1] (raw: as decoded, uint8, for `pp.to_model_range` on
    the devices) and labels int32 (n,)."""
    images, labels = self._rows(seed, step, row_positions(global_batch, rows), global_batch)
    return (images if raw else pp.to_model_range(images)), labels

  def _rows(self, seed: int, step: int, positions, global_batch: int):
    pairs = [self.example(seed, step, int(p), global_batch) for p in positions]
    return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs], np.int32)

  def iterator(self, seed: int, start_step: int, global_batch: int, rows=None,
               raw: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """batch(seed, s, global_batch, rows, raw) for s = start_step, start_step+1, ..., read and decoded
    by `workers` threads (PIL and the readers release the GIL while decoding and resizing, so the reads
    run in parallel), each batch split over all of them, `PREFETCH` batches ahead."""
    positions = row_positions(global_batch, rows)
    workers = self.workers or default_workers()
    chunk = -(-len(positions) // workers)
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='srdd-data')
    submit = lambda step: [pool.submit(self._rows, seed, step, positions[i:i + chunk], global_batch)
                           for i in range(0, len(positions), chunk)]
    queue = collections.deque(submit(start_step + k) for k in range(PREFETCH))
    step = start_step + PREFETCH
    try:
      while True:
        parts = [f.result() for f in queue.popleft()]
        queue.append(submit(step))
        step += 1
        images = np.concatenate([p[0] for p in parts])
        yield (images if raw else pp.to_model_range(images)), np.concatenate([p[1] for p in parts])
    finally:
      pool.shutdown(wait=False, cancel_futures=True)


# Batches an image source's iterator decodes ahead of the one it hands out.
PREFETCH = 2


def default_workers() -> int:
  """config.data.workers=0: two threads per CPU core this process may use, at most 64. Two, because a
  thread also waits: for its file (a bucket's latency), and for the GIL in the Python between decodes."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    cores = os.cpu_count() or 1
  return max(1, min(64, 2 * cores))
