"""`--mode=reconstruct`: the tokenizer end to end on a few images, with PSNR and an image grid."""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from srdd_jax.convert import params_io
from srdd_jax.convert import var_vqvae
from srdd_jax.tokenizer.api import Tokenizer, unbox
from srdd_jax.tokenizer.vqvae import VQVAEConfig


def _load_tokenizer(tc, seed):
  """(config, params, where the weights came from, images the source supplies or None)."""
  if tc.checkpoint:
    config, params = params_io.load_vqvae(tc.checkpoint)
    return config, params, f'converted checkpoint {tc.checkpoint}', None
  if tc.reference_npz and os.path.isfile(tc.reference_npz):
    with np.load(tc.reference_npz) as z:
      meta = json.loads(str(z['meta']))
      from srdd_jax.tools.reference_vqvae import vqvae_config_from_meta  # pylint: disable=import-outside-toplevel
      config = vqvae_config_from_meta(meta, tc.reference_npz)
      params = var_vqvae.convert_vqvae({k[4:]: z[k] for k in z.files if k.startswith('vae/')}, config)
      images = np.transpose(z['img'], (0, 2, 3, 1)).astype(np.float32) if 'img' in z.files else None
    return config, params, f'reference file {tc.reference_npz} (VAR code, random weights)', images
  config = VQVAEConfig(vocab_size=tc.vocab_size, z_channels=tc.z_channels, ch=tc.ch,
                       ch_mult=tuple(tc.ch_mult), patch_nums=tuple(tc.patch_nums),
                       share_quant_resi=tc.share_quant_resi, precision=tc.precision)
  logging.warning('no tokenizer weights: tokenizer.checkpoint is empty and %s does not exist; using '
                  'freshly initialised weights, so the reconstructions are not meaningful',
                  tc.reference_npz)
  params = unbox(Tokenizer(config).init(jax.random.PRNGKey(seed)))
  return config, params, 'fresh random initialisation (no weights found)', None


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


def to_uint8(x) -> np.ndarray:
  return np.asarray(np.clip(np.round((np.asarray(x) + 1) * 127.5), 0, 255), np.uint8)


def psnr(a, b) -> float:
  """PSNR in dB of images in [-1, 1] after quantisation to 8 bits."""
  mse = np.mean((to_uint8(a).astype(np.float64) - to_uint8(b).astype(np.float64)) ** 2)
  return float('inf') if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def run(config, workdir: str) -> dict:
  t0 = time.time()
  jax.config.update('jax_default_matmul_precision', config.tokenizer.precision)
  vq_config, params, source, images = _load_tokenizer(config.tokenizer, config.seed)
  logging.info('tokenizer weights: %s', source)
  tok = Tokenizer(vq_config)
  if images is None:
    images = synthetic_images(config.reconstruct.num_images, vq_config.image_size, config.seed)
  params = jax.device_put(params)
  encode = jax.jit(tok.img_to_idx)
  decode = jax.jit(tok.idx_to_img)
  bs = max(1, int(config.reconstruct.batch_size))
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
  np.savez(os.path.join(workdir, 'tokens.npz'), **{f'idx_{k}': a for k, a in enumerate(ids)})
  grid = np.concatenate([np.concatenate(list(to_uint8(images)), 1),
                         np.concatenate(list(to_uint8(rec)), 1)], 0)
  Image.fromarray(grid).save(os.path.join(workdir, 'reconstruction.png'))
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
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary
