"""VAR's multi-scale residual VQ-VAE in Flax Linen (NHWC, float32).

Module and parameter names follow the PyTorch state dict (`encoder/down_0/block_1/conv2/kernel` is
`encoder.down.0.block.1.conv2.weight`), so `srdd_jax.convert` maps checkpoints by one rule.
"""
import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax.tokenizer import layers
from srdd_jax.tokenizer import resample

PRECISIONS = {
    'default': jax.lax.Precision.DEFAULT,
    'high': jax.lax.Precision.HIGH,
    'highest': jax.lax.Precision.HIGHEST,
}


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
  """Hyper-parameters of the tokenizer; the defaults are VAR's `vae_ch160v4096z32` at 256 px."""
  vocab_size: int = 4096
  z_channels: int = 32  # Cvae.
  ch: int = 160
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2  # Encoder; the decoder has one more per level.
  using_sa: bool = True
  using_mid_sa: bool = True
  in_channels: int = 3
  patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  # phi sharing: 0 = one phi per scale (or `default_qresi_counts`), 1 = one shared phi,
  # K >= 2 = K phis assigned to scales by nearest tick (VAR uses 4).
  share_quant_resi: int = 4
  default_qresi_counts: int = 0
  quant_resi: float = 0.5
  # Matmul/conv precision. 'highest' keeps the tokenizer in true float32 on TPU/GPU, which the
  # token ids depend on; 'default' is faster for bulk tokenization where exact parity is not needed.
  precision: str = 'highest'

  def __post_init__(self):
    object.__setattr__(self, 'ch_mult', tuple(int(m) for m in self.ch_mult))
    object.__setattr__(self, 'patch_nums', tuple(int(p) for p in self.patch_nums))
    self.validate()

  def validate(self):
    def bad(key, value, why):
      raise ValueError(f'VQVAEConfig.{key}={value!r}: {why}')

    if self.vocab_size < 1:
      bad('vocab_size', self.vocab_size, 'must be >= 1')
    if self.z_channels < 1:
      bad('z_channels', self.z_channels, 'must be >= 1')
    if not self.ch_mult:
      bad('ch_mult', self.ch_mult, 'needs at least one level')
    for m in self.ch_mult:
      if (self.ch * m) % 32:
        bad('ch', self.ch, f'ch*{m} = {self.ch * m} channels must be divisible by the 32 GroupNorm groups')
    if not self.patch_nums or any(p < 1 for p in self.patch_nums):
      bad('patch_nums', self.patch_nums, 'must be a non-empty sequence of positive sides')
    if any(b <= a for a, b in zip(self.patch_nums, self.patch_nums[1:])):
      bad('patch_nums', self.patch_nums, 'the sides must increase strictly (the last is the latent side)')
    if self.share_quant_resi < 0:
      bad('share_quant_resi', self.share_quant_resi, 'must be 0 (per scale), 1 (shared) or K >= 2')
    if self.precision not in PRECISIONS:
      bad('precision', self.precision, f'must be one of {sorted(PRECISIONS)}')

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def latent_side(self) -> int:
    return self.patch_nums[-1]

  @property
  def image_size(self) -> int:
    return self.latent_side * self.downsample

  @property
  def num_scales(self) -> int:
    return len(self.patch_nums)

  @property
  def seq_len(self) -> int:
    return sum(p * p for p in self.patch_nums)

  @property
  def num_phis(self) -> int:
    if abs(self.quant_resi) <= 1e-6:
      return 0
    if self.share_quant_resi == 0:
      return self.default_qresi_counts or self.num_scales
    return self.share_quant_resi

  @property
  def lax_precision(self):
    return PRECISIONS[self.precision]

  def phi_map(self) -> tuple[int, ...]:
    return phi_index_map(self.num_scales, self.num_phis)


def phi_index_map(num_scales: int, num_phis: int) -> tuple[int, ...]:
  """Which phi each scale uses: the nearest of K ticks to k/(S-1), in float64 exactly as VAR.

  For S=10, K=4 this is (0,0,1,1,1,2,2,3,3,3); scale 2 sits on an exact tie in real numbers that
  float64 resolves to phi 1, so the computation must stay in float64.
  """
  if num_phis <= 0:
    return (-1,) * num_scales
  if num_phis == 1:
    return (0,) * num_scales
  k = num_phis
  ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
  out = []
  for si in range(num_scales):
    # VAR divides by S-1; a single-scale model has only "the last scale", at 1.0.
    at = si / (num_scales - 1) if num_scales > 1 else 1.0
    out.append(int(np.argmin(np.abs(ticks - at))))
  return tuple(out)


class Encoder(nn.Module):
  config: VQVAEConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    p = c.lax_precision
    h = layers.Conv(c.ch, 3, name='conv_in', precision=p)(x)
    n = len(c.ch_mult)
    for i in range(n):
      h = _EncoderLevel(c.ch * c.ch_mult[i], c.num_res_blocks, c.using_sa and i == n - 1, i != n - 1,
                        precision=p, name=f'down_{i}')(h)
    h = _MidBlock(c.using_mid_sa, precision=p, name='mid')(h)
    h = layers.GroupNorm(name='norm_out')(h)
    return layers.Conv(c.z_channels, 3, name='conv_out', precision=p)(nn.silu(h))


class _EncoderLevel(nn.Module):
  channels: int
  num_blocks: int
  with_attn: bool
  with_down: bool
  precision: layers.Precision = None

  @nn.compact
  def __call__(self, h):
    for j in range(self.num_blocks):
      h = layers.ResnetBlock(self.channels, precision=self.precision, name=f'block_{j}')(h)
      if self.with_attn:
        h = layers.AttnBlock(precision=self.precision, name=f'attn_{j}')(h)
    if self.with_down:
      h = layers.Downsample(precision=self.precision, name='downsample')(h)
    return h


class _DecoderLevel(nn.Module):
  channels: int
  num_blocks: int
  with_attn: bool
  with_up: bool
  precision: layers.Precision = None

  @nn.compact
  def __call__(self, h):
    for j in range(self.num_blocks):
      h = layers.ResnetBlock(self.channels, precision=self.precision, name=f'block_{j}')(h)
      if self.with_attn:
        h = layers.AttnBlock(precision=self.precision, name=f'attn_{j}')(h)
    if self.with_up:
      h = layers.Upsample(precision=self.precision, name='upsample')(h)
    return h


class _MidBlock(nn.Module):
  with_attn: bool
  precision: layers.Precision = None

  @nn.compact
  def __call__(self, h):
    c = h.shape[-1]
    h = layers.ResnetBlock(c, precision=self.precision, name='block_1')(h)
    if self.with_attn:
      h = layers.AttnBlock(precision=self.precision, name='attn_1')(h)
    return layers.ResnetBlock(c, precision=self.precision, name='block_2')(h)


class Decoder(nn.Module):
  config: VQVAEConfig

  @nn.compact
  def __call__(self, z):
    c = self.config
    p = c.lax_precision
    n = len(c.ch_mult)
    h = layers.Conv(c.ch * c.ch_mult[-1], 3, name='conv_in', precision=p)(z)
    h = _MidBlock(c.using_mid_sa, precision=p, name='mid')(h)
    for i in reversed(range(n)):
      h = _DecoderLevel(c.ch * c.ch_mult[i], c.num_res_blocks + 1, c.using_sa and i == n - 1, i != 0,
                        precision=p, name=f'up_{i}')(h)
    h = layers.GroupNorm(name='norm_out')(h)
    return layers.Conv(c.in_channels, 3, name='conv_out', precision=p)(nn.silu(h))


class Phi(nn.Module):
  """phi(h) = (1 - r) h + r Conv3x3(h): VAR's `quant_resi` refinement of an upsampled code map."""
  ratio: float
  precision: layers.Precision = None

  @nn.compact
  def __call__(self, h):
    c = h.shape[-1]
    kernel, bias = layers.conv_params(self, c, c, 3)
    r = abs(self.ratio)
    return h * (1 - r) + layers.conv2d(h, kernel, bias, precision=self.precision) * r


class _SharedPhis(nn.Module):
  """Container for sharing modes 1 (`qresi`) and K >= 2 (`qresi_ls_i`), named like VAR's modules."""
  count: int
  shared: bool
  ratio: float
  precision: layers.Precision = None

  def setup(self):
    if self.shared:
      self.qresi = Phi(self.ratio, self.precision)
    else:
      self.qresi_ls = [Phi(self.ratio, self.precision) for _ in range(self.count)]

  def __call__(self, h, i):
    return self.qresi(h) if self.shared else self.qresi_ls[i](h)


class Codebook(nn.Module):
  vocab_size: int
  dim: int

  @nn.compact
  def __call__(self):
    v = self.vocab_size
    init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -1 / v, 1 / v)
    return self.param('embedding', nn.with_logical_partitioning(init, ('vocab', 'vq_embed')),
                      (v, self.dim), jnp.float32)


class MultiScaleQuantizer(nn.Module):
  """Shared codebook + the phi refiners, and the scale-wise residual quantization of VAR."""
  config: VQVAEConfig

  def setup(self):
    c = self.config
    p = c.lax_precision
    self.embedding = Codebook(c.vocab_size, c.z_channels)
    self._phi_map = c.phi_map()
    if c.num_phis == 0:
      self._phis = None
    elif c.share_quant_resi == 0:
      # VAR's non-shared mode is a plain ModuleList: keys `quant_resi.{i}.weight`.
      self.quant_resi = [Phi(c.quant_resi, p) for _ in range(c.num_phis)]
    else:
      self.quant_resi = _SharedPhis(c.num_phis, c.share_quant_resi == 1, c.quant_resi, p)

  def phi(self, h, si):
    c = self.config
    if c.num_phis == 0:
      return h
    i = self._phi_map[si]
    return self.quant_resi[i](h) if c.share_quant_resi == 0 else self.quant_resi(h, i)

  def touch_all(self, h):
    """Runs every phi once so `init` creates all of them, used or not by the scale map."""
    c = self.config
    self.embedding()
    for i in range(c.num_phis):
      h = self.quant_resi[i](h) if c.share_quant_resi == 0 else self.quant_resi(h, i)
    return h

  def codes(self):
    return self.embedding()

  def lookup(self, idx, side):
    """Token ids (B, side*side) -> code map (B, side, side, Cvae), row-major like VAR."""
    e = self.embedding()
    return jnp.take(e, idx, axis=0).reshape(idx.shape[0], side, side, e.shape[-1])

  def distances(self, z):
    """(N, Cvae) -> (N, V) squared distances ||z||^2 + ||e||^2 - 2 z.e, the expansion VAR uses."""
    e = self.embedding()
    hp = jax.lax.Precision.HIGHEST  # Token ids hinge on these distances: always true float32.
    z = z.astype(jnp.float32)
    return (jnp.sum(z * z, axis=-1, keepdims=True) + jnp.sum(e * e, axis=-1)
            - 2.0 * jnp.einsum('nc,vc->nv', z, e, precision=hp))

  def nearest(self, z):
    return jnp.argmin(self.distances(z), axis=-1).astype(jnp.int32)

  def scale_residual(self, idx, si):
    """phi(upsample(E[idx_k])): the contribution of scale k's tokens to f_hat at full latent size."""
    c = self.config
    pn, side = c.patch_nums[si], c.latent_side
    h = self.lookup(idx, pn)
    if si != c.num_scales - 1:
      h = resample.bicubic_resize(h, side)
    return self.phi(h, si)

  def f_to_idx(self, f, return_fhat=False):
    """f (B, h, w, Cvae) -> per-scale token ids [(B, pn^2)] (and the cumulative f_hat per scale)."""
    c = self.config
    b = f.shape[0]
    f = f.astype(jnp.float32)
    f_rest = f
    f_hat = jnp.zeros_like(f)
    ids, fhats = [], []
    for si, pn in enumerate(c.patch_nums):
      z = resample.area_resize(f_rest, pn) if si != c.num_scales - 1 else f_rest
      idx = self.nearest(z.reshape(-1, z.shape[-1])).reshape(b, pn * pn)
      h = self.scale_residual(idx, si)
      f_hat = f_hat + h
      f_rest = f_rest - h
      ids.append(idx)
      fhats.append(f_hat)
    return (ids, fhats) if return_fhat else ids

  def quantize_train(self, f, beta: float):
    """Training form of `f_to_idx`: (straight-through f_hat, VQ loss, per-scale code hits (S, V), the
    vectors quantized (B * L, Cvae): every scale's area-pooled residuals, one row per token).

    Per scale k the loss is beta * ||sg(f_hat_k) - f||^2 + ||f_hat_k - sg(f)||^2 (means over elements),
    averaged over the S scales: the first term pulls the encoder to its codes, the second the codes and
    phi to the encoder. The token choice uses the same float32 residuals as `f_to_idx` (VAR quantizes a
    detached copy of f), so training and inference pick the same ids. The decoder's gradient reaches the
    encoder only, through f_hat_st = f + sg(f_hat - f).
    """
    c = self.config
    b = f.shape[0]
    f = f.astype(jnp.float32)
    f_ng = jax.lax.stop_gradient(f)
    f_rest = f_ng
    f_hat = jnp.zeros_like(f)
    loss = jnp.zeros([], jnp.float32)
    hits, quantized = [], []
    for si, pn in enumerate(c.patch_nums):
      z = resample.area_resize(f_rest, pn) if si != c.num_scales - 1 else f_rest
      quantized.append(z.reshape(-1, z.shape[-1]))
      idx = self.nearest(quantized[-1])
      hits.append(jnp.zeros((c.vocab_size,), jnp.float32).at[idx].add(1.0))
      h = self.scale_residual(idx.reshape(b, pn * pn), si)
      f_hat = f_hat + h
      f_rest = f_rest - jax.lax.stop_gradient(h)
      loss = loss + beta * jnp.mean(jnp.square(jax.lax.stop_gradient(f_hat) - f)) \
          + jnp.mean(jnp.square(f_hat - f_ng))
    f_hat_st = f + jax.lax.stop_gradient(f_hat - f)
    return f_hat_st, loss / c.num_scales, jnp.stack(hits), jnp.concatenate(quantized)


class VQVAE(nn.Module):
  config: VQVAEConfig

  def setup(self):
    c = self.config
    p = c.lax_precision
    self.encoder = Encoder(c)
    self.decoder = Decoder(c)
    self.quant_conv = layers.Conv(c.z_channels, 3, precision=p)
    self.post_quant_conv = layers.Conv(c.z_channels, 3, precision=p)
    self.quantize = MultiScaleQuantizer(c)

  def __call__(self, img):
    """Reconstruction; under `init` it also creates every phi."""
    f = self.encode(img)
    if self.is_initializing():
      self.quantize.touch_all(f)
    _, fhats = self.quantize.f_to_idx(f, return_fhat=True)
    return self.decode(fhats[-1])

  def encode(self, img):
    return self.quant_conv(self.encoder(img))

  def train_forward(self, img, beta: float = 0.25):
    """Training pass: (unclipped reconstruction, {'f', 'vq_loss', 'hits', 'quantized'}); see
    `quantize_train`.

    The reconstruction is not clipped to [-1, 1] (clipping would zero the gradient of every pixel
    outside it); `decode` and `__call__` clip, as VAR's inference does.
    """
    f = self.encode(img)
    f_hat, vq_loss, hits, quantized = self.quantize.quantize_train(f, beta)
    recon = self.decoder(self.post_quant_conv(f_hat))
    return recon, {'f': f, 'vq_loss': vq_loss, 'hits': hits, 'quantized': quantized}

  def decode(self, f_hat):
    return jnp.clip(self.decoder(self.post_quant_conv(f_hat)), -1.0, 1.0)

  def f_to_idx(self, f, return_fhat=False):
    return self.quantize.f_to_idx(f, return_fhat)

  def img_to_idx(self, img):
    return self.quantize.f_to_idx(self.encode(img))

  def idx_to_fhat(self, ids: Sequence[jax.Array]):
    c = self.config
    f_hat = jnp.zeros((ids[0].shape[0], c.latent_side, c.latent_side, c.z_channels), jnp.float32)
    out = []
    for si, idx in enumerate(ids):
      f_hat = f_hat + self.quantize.scale_residual(idx, si)
      out.append(f_hat)
    return out

  def idx_to_var_input(self, ids: Sequence[jax.Array]):
    """Teacher forcing: for k >= 1, area(f_hat after scales < k, pn_k), flattened -> (B, L-1, Cvae)."""
    c = self.config
    b = ids[0].shape[0]
    f_hat = jnp.zeros((b, c.latent_side, c.latent_side, c.z_channels), jnp.float32)
    nxt = []
    for si in range(c.num_scales - 1):
      h = resample.bicubic_resize(self.quantize.lookup(ids[si], c.patch_nums[si]), c.latent_side)
      f_hat = f_hat + self.quantize.phi(h, si)
      pn = c.patch_nums[si + 1]
      nxt.append(resample.area_resize(f_hat, pn).reshape(b, pn * pn, c.z_channels))
    if not nxt:
      return jnp.zeros((b, 0, c.z_channels), jnp.float32)
    return jnp.concatenate(nxt, axis=1)

  def next_input(self, f_hat, idx, si: int):
    """Sampling update after scale `si`: f_hat += phi(up(E[idx])); returns (f_hat, input of si+1)."""
    c = self.config
    f_hat = f_hat + self.quantize.scale_residual(idx, si)
    if si == c.num_scales - 1:
      return f_hat, None
    pn = c.patch_nums[si + 1]
    nxt = resample.area_resize(f_hat, pn)
    return f_hat, nxt.reshape(nxt.shape[0], pn * pn, c.z_channels)


def count_params(params) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
