"""The tokenizer as pure functions of (params, inputs).

`Tokenizer(config)` holds no state but the (hashable, static) config: every method is a pure,
jittable, batch-polymorphic function of a parameter tree (the `params` collection, boxed or not) and
arrays. Images are NHWC in [-1, 1]; token ids are a list of S arrays (B, pn_k^2), row-major.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax.config import ConfigError, with_defaults
from srdd_jax.tokenizer.vqvae import VQVAE, VQVAEConfig


def is_concrete(x) -> bool:
  """False for traced values (inside jit), whose contents cannot be checked on the host."""
  tracer = getattr(jax.core, 'Tracer', None)  # Public in every JAX we support; guarded all the same.
  if tracer is not None:
    return not isinstance(x, tracer)
  try:
    np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return False
  return True


class Tokenizer:
  """VAR's multi-scale VQ-VAE: image <-> per-scale tokens, f_hat, teacher-forcing inputs."""

  def __init__(self, config: VQVAEConfig):
    self.config = config
    self.module = VQVAE(config)

  # --- parameters -------------------------------------------------------------------------------

  def init(self, rng: jax.Array, batch: int = 1):
    """Fresh parameters (boxed with their logical axis names; `nn.meta.unbox` drops the boxes)."""
    c = self.config
    x = jnp.zeros((batch, c.image_size, c.image_size, c.in_channels), jnp.float32)
    return self.module.init(rng, x)['params']

  def abstract_params(self):
    """Shapes and logical axis names of the parameters, allocating nothing."""
    return jax.eval_shape(lambda: self.init(jax.random.PRNGKey(0)))

  def _apply(self, params, *args, method):
    return self.module.apply({'params': params}, *args, method=method)

  # --- input checks -----------------------------------------------------------------------------

  def check_image(self, img) -> None:
    c = self.config
    shape = tuple(np.shape(img))
    if len(shape) != 4:
      raise ValueError(f'images must be NHWC (rank 4), got shape {shape}')
    _, h, w, ch = shape
    if ch != c.in_channels:
      raise ValueError(f'images have {ch} channels (shape {shape}) but the tokenizer expects '
                       f'{c.in_channels} (NHWC; was an NCHW array passed?)')
    if h != w:
      raise ValueError(f'images must be square, got {h}x{w}')
    if h % c.downsample:
      raise ValueError(f'image side {h} is not divisible by the downsampling factor {c.downsample} '
                       f'(ch_mult={c.ch_mult})')
    if h // c.downsample != c.latent_side:
      raise ValueError(
          f'image side {h} gives a {h // c.downsample}x{h // c.downsample} latent, but patch_nums '
          f'{c.patch_nums} ends at {c.latent_side}: feed {c.image_size} px images or end patch_nums '
          f'at {h // c.downsample}')

  def check_ids(self, ids: Sequence) -> None:
    c = self.config
    if len(ids) != c.num_scales:
      raise ValueError(f'expected token ids for {c.num_scales} scales (patch_nums={c.patch_nums}), '
                       f'got {len(ids)}')
    b = np.shape(ids[0])[0] if np.ndim(ids[0]) else None
    for k, idx in enumerate(ids):
      self.check_scale_ids(idx, k, batch=b)

  def check_scale_ids(self, idx, k: int, batch: int | None = None) -> None:
    c = self.config
    if not 0 <= k < c.num_scales:
      raise ValueError(f'scale index {k} out of range for {c.num_scales} scales')
    pn = c.patch_nums[k]
    shape = tuple(np.shape(idx))
    if len(shape) != 2 or shape[1] != pn * pn or (batch is not None and shape[0] != batch):
      want = f'({batch if batch is not None else "B"}, {pn * pn})'
      raise ValueError(f'token ids of scale {k} (pn={pn}) must have shape {want}, got {shape}')
    if not jnp.issubdtype(idx.dtype, jnp.integer):
      raise ValueError(f'token ids of scale {k} must be integers, got dtype {idx.dtype}')
    # Under jit the values are unknown; a gather would silently clamp, so check whenever we can.
    if is_concrete(idx) and np.size(idx):
      a = np.asarray(idx)
      lo, hi = int(a.min()), int(a.max())
      if lo < 0 or hi >= c.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f'token id {bad} at scale {k} is out of range [0, {c.vocab_size})')

  def _check_fhat(self, f_hat) -> None:
    c = self.config
    want = (c.latent_side, c.latent_side, c.z_channels)
    if np.ndim(f_hat) != 4 or tuple(np.shape(f_hat)[1:]) != want:
      raise ValueError(f'f_hat must have shape (B, {want[0]}, {want[1]}, {want[2]}), '
                       f'got {tuple(np.shape(f_hat))}')

  # --- the functions ----------------------------------------------------------------------------

  def encode(self, params, img):
    """image (B, H, W, 3) -> f = quant_conv(encoder(img)) (B, h, w, Cvae)."""
    self.check_image(img)
    return self._apply(params, img, method=VQVAE.encode)

  def f_to_idx(self, params, f, return_fhat: bool = False):
    """f -> per-scale token ids (and the cumulative f_hat after each scale)."""
    self._check_fhat(f)
    return self._apply(params, f, return_fhat, method=VQVAE.f_to_idx)

  def img_to_idx(self, params, img):
    """image -> token ids, a list of S arrays (B, pn_k^2) int32."""
    self.check_image(img)
    return self._apply(params, img, method=VQVAE.img_to_idx)

  def idx_to_fhat(self, params, ids):
    """token ids -> cumulative f_hat after each scale, a list of S arrays (B, h, w, Cvae)."""
    self.check_ids(ids)
    return self._apply(params, list(ids), method=VQVAE.idx_to_fhat)

  def fhat_to_img(self, params, f_hat):
    """f_hat -> image in [-1, 1]."""
    self._check_fhat(f_hat)
    return self._apply(params, f_hat, method=VQVAE.decode)

  def idx_to_img(self, params, ids):
    return self.fhat_to_img(params, self.idx_to_fhat(params, ids)[-1])

  def reconstruct(self, params, img):
    """image -> tokens -> image, in [-1, 1]."""
    self.check_image(img)
    return self._apply(params, img, method=VQVAE.__call__)

  def idx_to_var_input(self, params, ids):
    """token ids -> teacher-forcing input of the transformer (B, L-1, Cvae)."""
    self.check_ids(ids)
    return self._apply(params, list(ids), method=VQVAE.idx_to_var_input)

  def next_input(self, params, f_hat, idx, k: int):
    """Sampling update after scale k (static): (f_hat, tokens of k) -> (f_hat, input of k+1).

    The input of scale k+1 is (B, pn_{k+1}^2, Cvae); after the last scale it is None.
    """
    self._check_fhat(f_hat)
    self.check_scale_ids(idx, k, batch=np.shape(f_hat)[0])
    return self._apply(params, f_hat, idx, k, method=VQVAE.next_input)

  def zero_fhat(self, batch: int):
    c = self.config
    return jnp.zeros((batch, c.latent_side, c.latent_side, c.z_channels), jnp.float32)


def unbox(tree):
  return nn.meta.unbox(tree)


def tokenizer_config(config) -> VQVAEConfig:
  """The architecture that config.tokenizer describes, at the scales config.model.patch_nums: the one
  place a config becomes a VQVAEConfig. Errors name the config key."""
  c = with_defaults(config)
  t = c.tokenizer
  try:
    vq = VQVAEConfig(vocab_size=int(t.vocab_size), z_channels=int(t.z_channels), ch=int(t.ch),
                     ch_mult=tuple(t.ch_mult), num_res_blocks=int(t.num_res_blocks),
                     using_sa=bool(t.using_sa), using_mid_sa=bool(t.using_mid_sa),
                     patch_nums=tuple(c.model.patch_nums), share_quant_resi=int(t.share_quant_resi),
                     quant_resi=float(t.quant_resi), precision=str(t.precision))
  except ValueError as e:  # VQVAEConfig names its field; the config key is the same name.
    msg = str(e).replace('VQVAEConfig.patch_nums', 'config.model.patch_nums')
    raise ConfigError(msg.replace('VQVAEConfig.', 'config.tokenizer.')) from e
  size = int(t.image_size)
  if size and size != vq.image_size:
    raise ConfigError(
        f'config.tokenizer.image_size={size}, but config.model.patch_nums={vq.patch_nums} ends at a '
        f'{vq.latent_side}x{vq.latent_side} latent and ch_mult={vq.ch_mult} downsamples {vq.downsample}x, '
        f'which is {vq.image_size} px: end patch_nums at {size // vq.downsample} (or change ch_mult)')
  return vq
