"""`--mode=reconstruct`: the tokenizer end to end on a few images, with PSNR and an image grid."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from srdd_jax import files
from srdd_jax.config import ConfigError, with_defaults
from srdd_jax.convert.loading import check_checkpoint, load_tokenizer
from srdd_jax.data.images import signed_to_uint8 as to_uint8
from srdd_jax.parallel import multihost
from srdd_jax.tokenizer.api import Tokenizer


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
  """Smooth colour patterns in [-1, 1]: gradients, rings and blobs, deterministic in `seed`."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  out = []
  for _ in range(n):
    fx, fy, phase = rng.uniform(1, 4), rng.uniform(1, 4), rng.uniform(0, 2 * np.pi, 3)
    cx, cy = rng.uniform(0.3, 0.7, 2)
    r = np.hypot(xx - cx, yy - cy)
    img = np.stack([np.sin(2 * np.pi * fx * xx + phase[0]),
                    np.cos(2 * np.pi * fy * yy + phase[1]),
                    np.cos(2 * np.pi * 3 * r + phase[2])], -1)
    out.append(0.9 * img)
  return np.asarray(out, np.float32)


def psnr(a, b) -> float:
  """PSNR in dB of images in [-1, 1] after quantisation to 8 bits."""
  mse = np.mean((to_uint8(a).astype(np.float64) - to_uint8(b).astype(np.float64)) ** 2)
  return float('inf') if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def check(config) -> None:
  """config.reconstruct's values and the tokenizer it names (before anything is loaded)."""
  r = config.reconstruct
  for key in ('num_images', 'batch_size'):
    if int(r[key]) < 1:
      raise ConfigError(f'config.reconstruct.{key}={r[key]}: must be >= 1')
  if config.tokenizer.checkpoint:
    check_checkpoint(config, 'tokenizer')


def run(config, workdir: str) -> dict:
  t0 = time.time()
  config = with_defaults(config)
  check(config)
  jax.config.update('jax_default_matmul_precision', config.tokenizer.precision)
  tok = load_tokenizer(config, reference=True)
  vq_config, params, source, images = tok.config, tok.params, tok.source, tok.images
  if source.startswith('fresh'):
    logging.warning('no tokenizer weights: config.tokenizer.checkpoint is empty and %r does not exist; '
                    'the reconstructions of freshly initialised weights are not meaningful',
                    config.tokenizer.reference_npz)
  logging.info('tokenizer weights: %s', source)
  tok = Tokenizer(vq_config)
  if images is None:
    images = synthetic_images(config.reconstruct.num_images, vq_config.image_size, config.seed)
  params = jax.device_put(params)
  encode = jax.jit(tok.img_to_idx)
  decode = jax.jit(tok.idx_to_img)
  bs = int(config.reconstruct.batch_size)
  recs, all_ids = [], []
  t1 = time.time()
  for i in range(0, len(images), bs):
    ids = encode(params, jnp.asarray(images[i:i + bs]))
    recs.append(np.asarray(decode(params, ids)))
    all_ids.append([np.asarray(x) for x in ids])
    logging.info('reconstructed %d/%d images', min(i + bs, len(images)), len(images))
  rec = np.concatenate(recs)
  t2 = time.time()
  ids = [np.concatenate([b[k] for b in all_ids]) for k in range(vq_config.num_scales)]
  grid = np.concatenate([np.concatenate(list(to_uint8(images)), 1),
                         np.concatenate(list(to_uint8(rec)), 1)], 0)
  summary = {
      'weights': source,
      'num_images': int(len(images)),
      'image_size': vq_config.image_size,
      'patch_nums': list(vq_config.patch_nums),
      'tokens_per_image': vq_config.seq_len,
      'psnr_db': psnr(images, rec),
      'seconds_load': round(t1 - t0, 2),
      'seconds_tokenize_and_decode': round(t2 - t1, 2),
      'outputs': ['reconstruction.png (top: input, bottom: reconstruction)', 'tokens.npz', 'summary.json'],
  }
  if multihost.is_main_process():  # Every process computed the same; one writes it.
    files.save_npz(files.join(workdir, 'tokens.npz'), **{f'idx_{k}': a for k, a in enumerate(ids)})
    files.save_image(files.join(workdir, 'reconstruction.png'), grid)
    files.write_json(files.join(workdir, 'summary.json'), summary)
  return summary
