"""Zero-shot editing with the scale-wise sampler (SPEC §7): in-/out-painting, class-conditional
editing and super-resolution.

The image is encoded to its token pyramid; a keep mask at latent resolution (1 = keep) is resized to
every scale (bilinear, align_corners=False, > 0.5) and, while sampling, the tokens of the kept region
are replaced by the image's own before f_hat is updated. The 1x1 scale is always kept.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax.diffusion.sampler import Sampler
from srdd_jax.tokenizer import resample

TASKS = ('inpaint', 'outpaint', 'class_edit', 'super_res')


def box_keep_mask(image_size: int, box: Sequence[int], keep_inside: bool) -> np.ndarray:
  """(H, W) float mask in pixels from a box (x0, y0, x1, y1), end-exclusive: 1 = keep."""
  x0, y0, x1, y1 = (int(v) for v in box)
  if not (0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size):
    raise ValueError(f'box {tuple(box)} must satisfy 0 <= x0 < x1 <= {image_size} and '
                     f'0 <= y0 < y1 <= {image_size}')
  inside = np.zeros((image_size, image_size), np.float32)
  inside[y0:y1, x0:x1] = 1.0
  return inside if keep_inside else 1.0 - inside


def latent_keep_mask(pixel_keep, downsample: int) -> np.ndarray:
  """Pixel keep mask (B, H, W) or (H, W) -> latent (.., h, w): a cell is kept only if all its pixels
  are, so no generated pixel is pinned to the original."""
  m = np.asarray(pixel_keep, np.float32) > 0.5
  h, w = m.shape[-2] // downsample, m.shape[-1] // downsample
  if h * downsample != m.shape[-2] or w * downsample != m.shape[-1]:
    raise ValueError(f'mask of shape {m.shape} is not divisible by the downsampling factor {downsample}')
  m = m.reshape(m.shape[:-2] + (h, downsample, w, downsample))
  return m.all(axis=(-3, -1)).astype(np.float32)


def scale_keep_masks(latent_keep, patch_nums: Sequence[int]) -> list[jax.Array]:
  """(B, h, w) latent keep mask -> per scale (B, pn^2) bool; the first (1x1) scale always kept."""
  m = jnp.asarray(latent_keep, jnp.float32)[..., None]
  out = []
  for si, pn in enumerate(patch_nums):
    if si == 0:
      out.append(jnp.ones((m.shape[0], pn * pn), bool))
      continue
    r = resample.bilinear_resize(m, pn)[..., 0] > 0.5
    out.append(r.reshape(m.shape[0], pn * pn))
  return out


def coarse_scale_masks(batch: int, patch_nums: Sequence[int], keep_scales: int) -> list[jax.Array]:
  """Super-resolution: every token of the first `keep_scales` scales kept, none after."""
  if not 1 <= keep_scales <= len(patch_nums):
    raise ValueError(f'keep_scales={keep_scales} must be in [1, {len(patch_nums)}]')
  return [jnp.full((batch, pn * pn), si < keep_scales) for si, pn in enumerate(patch_nums)]


def default_sr_keep_scales(low_res: int, image_size: int, patch_nums: Sequence[int]) -> int:
  """The coarse scales a low-resolution image determines: those no finer than its own detail,
  pn <= patch_nums[-1] * low_res / image_size (at least the first)."""
  limit = patch_nums[-1] * low_res / image_size
  return max(1, sum(1 for pn in patch_nums if pn <= limit))


class Editor:
  """Editing on top of a Sampler; images are NHWC in [-1, 1], outputs in [0, 1]."""

  def __init__(self, sampler: Sampler):
    self.sampler = sampler
    self.tokenizer = sampler.tokenizer

  def edit(self, var_params, vae_params, images, latent_keep, labels, rng):
    """In-/out-painting (labels = null class) or class-conditional editing (labels = the class).

    -> (token ids per scale, edited images in [0, 1], ground-truth ids, per-scale keep masks)."""
    gt = self.tokenizer.img_to_idx(vae_params, images)
    keep = scale_keep_masks(latent_keep, self.sampler.var_config.patch_nums)
    ids, f_hat = self.sampler.tokens(var_params, vae_params, labels, rng, gt, keep)
    return ids, self.sampler.decode(vae_params, f_hat), gt, keep

  def super_resolve(self, var_params, vae_params, low_res, keep_scales: int, labels, rng):
    """low_res (B, s, s, 3) in [-1, 1]: upsampled (bicubic) to the model's size, encoded, and its
    `keep_scales` coarsest scales kept; the finer ones are sampled."""
    size = self.tokenizer.config.image_size
    b = low_res.shape[0]
    up = jnp.clip(jax.image.resize(low_res, (b, size, size, low_res.shape[-1]), 'cubic'), -1, 1)
    gt = self.tokenizer.img_to_idx(vae_params, up)
    keep = coarse_scale_masks(b, self.sampler.var_config.patch_nums, keep_scales)
    ids, f_hat = self.sampler.tokens(var_params, vae_params, labels, rng, gt, keep)
    return ids, self.sampler.decode(vae_params, f_hat), gt, keep
