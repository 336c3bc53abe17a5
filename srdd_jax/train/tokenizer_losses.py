"""Losses and statistics of tokenizer training (SPEC §1, "Tokenizer training").

The VQ loss itself lives with the quantizer (`MultiScaleQuantizer.quantize_train`), next to the
residual loop it belongs to; this module holds what is computed on images and code counts. All of it
runs in float32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def reconstruction_losses(images, recon) -> dict:
  """Mean absolute and mean squared error of the reconstruction, over every pixel and channel."""
  d = recon.astype(jnp.float32) - images.astype(jnp.float32)
  return {'l1': jnp.mean(jnp.abs(d)), 'l2': jnp.mean(jnp.square(d))}


def hinge_d_loss(logits_real, logits_fake):
  """Discriminator hinge loss: (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))) / 2."""
  real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (real + fake)


def hinge_g_loss(logits_fake):
  """The generator's side of the hinge game: -mean D(x_rec)."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


def to_uint8_levels(x):
  """Images in [-1, 1] -> their 8-bit values (as float32), the quantisation a saved PNG applies."""
  return jnp.clip(jnp.round((x.astype(jnp.float32) + 1.0) * 127.5), 0.0, 255.0)


def squared_error_per_image(images, recon):
  """Mean squared error of each image in 8-bit levels, (B,): PSNR is computed from its average on the
  host, the same definition as `srdd_jax.reconstruct.psnr` (the set's MSE, not a mean of PSNRs)."""
  d = to_uint8_levels(recon) - to_uint8_levels(images)
  return jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))


def psnr_from_mse(mse: float) -> float:
  """PSNR in dB of 8-bit images with mean squared error `mse`."""
  return float('inf') if mse <= 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def usage_statistics(hits) -> dict:
  """Per-scale code statistics of one batch from hit counts (S, V).

  `usage_s{k}`: the share of the V codes chosen at least once at scale k; `perplexity_s{k}`:
  exp(entropy) of the codes' frequencies at scale k, the effective number of codes used (V at best).
  """
  hits = hits.astype(jnp.float32)
  p = hits / jnp.maximum(jnp.sum(hits, axis=-1, keepdims=True), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
  used = jnp.mean((hits > 0).astype(jnp.float32), axis=-1)
  out = {}
  for k in range(hits.shape[0]):
    out[f'usage_s{k}'] = used[k]
    out[f'perplexity_s{k}'] = jnp.exp(entropy[k])
  return out
