"""Held-out evaluation of tokenizer training: 8-bit PSNR over a fixed image set, and the grid of
originals over reconstructions."""
from __future__ import annotations


import jax
import numpy as np

from srdd_jax import files
from srdd_jax.data.images import signed_to_uint8
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import multihost
from srdd_jax.train import tokenizer_losses as losses
from srdd_jax.train.tokenizer_settings import TrainSettings
from srdd_jax.train.tokenizer_step import TokenizerTrainer


class HeldOut:
  """A fixed set of held-out images, reconstructed in global batches split over the mesh.

  The images are decoded again at each evaluation, each process only its rows of each batch: 256 images
  of 256 px would otherwise hold 200 MB of host memory for the whole run.
  """

  def __init__(self, source, s: TrainSettings, trainer: TokenizerTrainer, mesh):
    self.source, self.seed = source, s.seed
    self.n = min(s.eval_examples, source.num_examples)
    data_par = pm.data_parallel_size(mesh)
    self.batch = -(-min(s.global_batch, self.n) // data_par) * data_par
    self.padded = -(-self.n // self.batch) * self.batch  # The last image repeats; its errors are dropped.
    self.grid = min(s.grid_examples, self.n)
    self.rows = trainer.local_rows(self.batch)
    self.trainer = trainer
    self.fn = trainer.eval_fn
    self.description = source.description

  def images(self, lo: int, hi: int) -> np.ndarray:
    """Positions [lo, hi) of the padded set: the seed's first n examples as centre crops."""
    load = lambda a, b: self.source.batch(self.seed, 0, self.n, slice(a, b))[0]
    real = load(lo, min(hi, self.n)) if lo < self.n else None
    pad = hi - max(lo, self.n)
    if pad <= 0:
      return real
    last = np.repeat(load(self.n - 1, self.n), pad, axis=0)
    return last if real is None else np.concatenate([real, last])

  def evaluate(self, params):
    """(PSNR in dB over the set, code usage over the set (`code_usage`), first `grid` originals and
    reconstructions as numpy)."""
    errors, hits, first = [], [], None
    for i in range(0, self.padded, self.batch):
      local = np.concatenate([self.images(i + r.start, i + r.stop) for r in self.rows])
      batch = self.trainer.assemble_batch({'images': local}, self.batch)['images']
      err, recon, h = self.fn(params, batch)
      errors.append(np.asarray(jax.device_get(err)))
      hits.append(np.asarray(jax.device_get(h)))
      if first is None:
        first = multihost.gather(recon)[:self.grid]
    mse = float(np.mean(np.concatenate(errors)[:self.n]))
    usage = code_usage(np.concatenate(hits)[:self.n].sum(axis=0))
    return losses.psnr_from_mse(mse), usage, self.images(0, self.grid), first


def code_usage(hits) -> dict:
  """Codebook use over a set of images from hit counts (S, V): per scale the share of the V codes chosen
  at least once (`eval_usage_s{k}`) and the perplexity of their frequencies, and `eval_dead_codes`, the
  codes chosen at no scale by any image of the set."""
  hits = np.asarray(hits, np.float64)
  out = {}
  for k, h in enumerate(hits):
    p = h / max(h.sum(), 1.0)
    nz = p[p > 0]
    out[f'eval_usage_s{k}'] = float(np.mean(h > 0))
    out[f'eval_perplexity_s{k}'] = float(np.exp(-np.sum(nz * np.log(nz))))
  out['eval_dead_codes'] = int(np.sum(hits.sum(axis=0) == 0))
  return out


def _write_grid(path: str, originals, recons) -> np.ndarray:
  """Originals on top, reconstructions below, one column per image."""
  u8 = lambda x: np.asarray(np.clip(np.round((np.asarray(x) + 1) * 127.5), 0, 255), np.uint8)
  grid = np.concatenate([np.concatenate(list(u8(originals)), 1), np.concatenate(list(u8(recons)), 1)], 0)
  files.save_image(path, grid)
  return grid


def write_grid(path: str, originals, recons) -> np.ndarray:
  """Originals on top, reconstructions below, one column per image; written atomically."""
  grid = np.concatenate([np.concatenate(list(signed_to_uint8(originals)), 1),
                         np.concatenate(list(signed_to_uint8(recons)), 1)], 0)
  files.save_image(path, grid)
  return grid
