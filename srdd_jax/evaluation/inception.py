"""pytorch-fid's FID InceptionV3 (the TF `inception-2015-12-05` graph) in Flax Linen, NHWC, and batched
feature extraction.

What makes this network differ from torchvision's InceptionV3, all of which decides the FID numbers:
1008 classes, BatchNorm eps 1e-3, the average pools of the A, C and E_1 blocks divide by the number of
valid pixels (TF's convention; PyTorch's default counts the zero padding), and the pool branch of the
last block (E_2) is a 3x3 max pool. Inputs follow pytorch-fid: images in [0, 1], bilinear resize to
299 x 299 with PyTorch's `align_corners=False` weights, then 2x - 1.

Module names mirror the state-dict keys of pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
(`Mixed_6b.branch7x7dbl_3.conv.weight` -> `Mixed_6b/branch7x7dbl_3/conv/kernel`), so
srdd_jax.evaluation.inception_weights maps them with the project's one key rule.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax.parallel.compile import jit_inference
from srdd_jax.tokenizer import resample

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL3_DIM = 2048
BN_EPS = 1e-3

Precision = Any


class FrozenBatchNorm(nn.Module):
  """Inference-only BatchNorm.

  The running statistics live in `params` rather than in a `batch_stats` collection: this network is
  never trained, so one pytree holds the whole function and the strict converter checks the
  statistics like any other weight.
  """
  eps: float = BN_EPS

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    mean = self.param('running_mean', nn.initializers.zeros, (c,), jnp.float32)
    var = self.param('running_var', nn.initializers.ones, (c,), jnp.float32)
    mul = scale * jax.lax.rsqrt(var + self.eps)
    return x * mul + (bias - mean * mul)


class BasicConv2d(nn.Module):
  """Conv without bias -> BatchNorm (eps 1e-3) -> ReLU, torchvision's `BasicConv2d`."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: Precision = 'highest'

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel_size, strides=(self.strides, self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                name='conv')(x)
    return nn.relu(FrozenBatchNorm(name='bn')(x))


def _avg_pool_3x3(x):
  # TF's AvgPool with SAME padding divides by the valid pixels: count_include_pad=False in PyTorch.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class _Block(nn.Module):
  precision: Precision = 'highest'

  def conv(self, features, kernel, name, strides=1, padding=(0, 0)):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (padding, padding) if isinstance(padding, int) else padding
    return BasicConv2d(features, kernel, strides, padding, self.precision, name=name)


class InceptionA(_Block):
  """Mixed_5b/5c/5d (pytorch-fid's FIDInceptionA)."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv(64, 1, 'branch1x1')(x)
    b5 = self.conv(48, 1, 'branch5x5_1')(x)
    b5 = self.conv(64, 5, 'branch5x5_2', padding=2)(b5)
    b3 = self.conv(64, 1, 'branch3x3dbl_1')(x)
    b3 = self.conv(96, 3, 'branch3x3dbl_2', padding=1)(b3)
    b3 = self.conv(96, 3, 'branch3x3dbl_3', padding=1)(b3)
    bp = self.conv(self.pool_features, 1, 'branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Mixed_6a: grid reduction 35 -> 17."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv(384, 3, 'branch3x3', strides=2)(x)
    bd = self.conv(64, 1, 'branch3x3dbl_1')(x)
    bd = self.conv(96, 3, 'branch3x3dbl_2', padding=1)(bd)
    bd = self.conv(96, 3, 'branch3x3dbl_3', strides=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
  """Mixed_6b..6e (pytorch-fid's FIDInceptionC): factorised 7x7 convolutions."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = self.conv(192, 1, 'branch1x1')(x)
    b7 = self.conv(c7, 1, 'branch7x7_1')(x)
    b7 = self.conv(c7, (1, 7), 'branch7x7_2', padding=(0, 3))(b7)
    b7 = self.conv(192, (7, 1), 'branch7x7_3', padding=(3, 0))(b7)
    bd = self.conv(c7, 1, 'branch7x7dbl_1')(x)
    bd = self.conv(c7, (7, 1), 'branch7x7dbl_2', padding=(3, 0))(bd)
    bd = self.conv(c7, (1, 7), 'branch7x7dbl_3', padding=(0, 3))(bd)
    bd = self.conv(c7, (7, 1), 'branch7x7dbl_4', padding=(3, 0))(bd)
    bd = self.conv(192, (1, 7), 'branch7x7dbl_5', padding=(0, 3))(bd)
    bp = self.conv(192, 1, 'branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """Mixed_7a: grid reduction 17 -> 8."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv(192, 1, 'branch3x3_1')(x)
    b3 = self.conv(320, 3, 'branch3x3_2', strides=2)(b3)
    b7 = self.conv(192, 1, 'branch7x7x3_1')(x)
    b7 = self.conv(192, (1, 7), 'branch7x7x3_2', padding=(0, 3))(b7)
    b7 = self.conv(192, (7, 1), 'branch7x7x3_3', padding=(3, 0))(b7)
    b7 = self.conv(192, 3, 'branch7x7x3_4', strides=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
  """Mixed_7b (FIDInceptionE_1, average pool) and Mixed_7c (FIDInceptionE_2, max pool)."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = self.conv(320, 1, 'branch1x1')(x)
    b3 = self.conv(384, 1, 'branch3x3_1')(x)
    b3 = jnp.concatenate([self.conv(384, (1, 3), 'branch3x3_2a', padding=(0, 1))(b3),
                          self.conv(384, (3, 1), 'branch3x3_2b', padding=(1, 0))(b3)], axis=-1)
    bd = self.conv(448, 1, 'branch3x3dbl_1')(x)
    bd = self.conv(384, 3, 'branch3x3dbl_2', padding=1)(bd)
    bd = jnp.concatenate([self.conv(384, (1, 3), 'branch3x3dbl_3a', padding=(0, 1))(bd),
                          self.conv(384, (3, 1), 'branch3x3dbl_3b', padding=(1, 0))(bd)], axis=-1)
    if self.max_pool:
      # The TF graph has a max pool here (likely a bug there, kept for comparability); padded
      # positions are -inf, as in PyTorch's max_pool2d.
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = self.conv(192, 1, 'branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """(B, 299, 299, 3) in [-1, 1] -> pool3 (B, 2048), logits (B, 1008)."""
  num_classes: int = NUM_CLASSES
  precision: Precision = 'highest'

  @nn.compact
  def __call__(self, x):
    p = self.precision
    conv = functools.partial(BasicConv2d, precision=p)
    x = conv(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = conv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = conv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_s2(x)
    x = conv(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = conv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(p, pool_features=32, name='Mixed_5b')(x)
    x = InceptionA(p, pool_features=64, name='Mixed_5c')(x)
    x = InceptionA(p, pool_features=64, name='Mixed_5d')(x)
    x = InceptionB(p, name='Mixed_6a')(x)
    x = InceptionC(p, channels_7x7=128, name='Mixed_6b')(x)
    x = InceptionC(p, channels_7x7=160, name='Mixed_6c')(x)
    x = InceptionC(p, channels_7x7=160, name='Mixed_6d')(x)
    x = InceptionC(p, channels_7x7=192, name='Mixed_6e')(x)
    x = InceptionD(p, name='Mixed_7a')(x)
    x = InceptionE(p, max_pool=False, name='Mixed_7b')(x)
    x = InceptionE(p, max_pool=True, name='Mixed_7c')(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, precision=p, name='fc')(pool3)
    return pool3, logits


# The smallest square input the strided layers accept; enough to create parameters cheaply.
_MIN_SIDE = 75


def abstract_params(num_classes: int = NUM_CLASSES):
  """Parameter shapes of the network, without allocating or computing anything."""
  x = jax.ShapeDtypeStruct((1, _MIN_SIDE, _MIN_SIDE, 3), jnp.float32)
  model = FIDInceptionV3(num_classes)
  return jax.eval_shape(lambda v: model.init(jax.random.PRNGKey(0), v), x)['params']


def init_params(rng: jax.Array, num_classes: int = NUM_CLASSES):
  """Random parameters (benchmarks and tests only: never for a reported metric)."""
  model = FIDInceptionV3(num_classes)
  x = jnp.zeros((1, _MIN_SIDE, _MIN_SIDE, 3), jnp.float32)
  return jax.jit(lambda r: model.init(r, x)['params'])(rng)


def preprocess(images: jax.Array) -> jax.Array:
  """NHWC uint8 in [0, 255] or float in [0, 1], any size -> float32 (B, 299, 299, 3) in [-1, 1].

  As pytorch-fid: `ToTensor` (x / 255), bilinear resize with align_corners=False, then 2x - 1. A
  one-channel image is repeated to RGB, as PIL's `convert('RGB')` does before pytorch-fid sees it.
  """
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 255.0  # A division, as torch's ToTensor, not a multiply by 1/255.
  else:
    x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = resample.bilinear_resize(x, INPUT_SIZE)
  return 2.0 * x - 1.0


@functools.lru_cache(maxsize=None)
def _features_fn(precision: str | None):
  model = FIDInceptionV3(precision=precision)

  def features(params, images):
    pool3, logits = model.apply({'params': params}, preprocess(images))
    return {'pool3': pool3, 'logits': logits}

  # One jitted function per precision, so every call with the same shapes reuses one compilation.
  # The sampler's CPU options (XLA:CPU's YNN fusion off) make this network ~2.5x faster on CPU
  # (docs/PERFORMANCE.md); other backends get plain jax.jit.
  return jit_inference(features)


def check_images(images, what: str = 'images') -> None:
  """Raises ValueError naming the problem unless `images` is NHWC uint8, or float in [0, 1]."""
  shape = tuple(images.shape)
  if len(shape) != 4 or shape[-1] not in (1, 3):
    raise ValueError(f'{what}: expected NHWC images with 1 or 3 channels, got shape {shape}')
  if shape[0] == 0:
    raise ValueError(f'{what}: no images (shape {shape})')
  dtype = np.dtype(images.dtype)
  if dtype == np.uint8:
    return
  if not np.issubdtype(dtype, np.floating):
    raise ValueError(f'{what}: expected uint8 or floating images, got dtype {dtype}')
  lo, hi = float(jnp.min(images)), float(jnp.max(images))
  # Images in [-1, 1] would silently give other features, so a wrong range is an error.
  if not (lo >= 0.0 and hi <= 1.0):
    raise ValueError(f'{what}: float images must lie in [0, 1] (uint8-equivalent), found values in '
                     f'[{lo:.4g}, {hi:.4g}]; convert [-1, 1] images with (x + 1) / 2')


def extract(params, images, *, batch_size: int = 64, precision: str | None = 'highest'
            ) -> dict[str, np.ndarray]:
  """Inception features of NHWC `images` (uint8, or float in [0, 1]; any size), batch by batch.

  Returns float32 numpy arrays: `pool3` (N, 2048), the FID features; `logits` (N, 1008) = fc(pool3);
  `logits_unbiased` (N, 1008) = pool3 @ W without the fc bias, the logits the Inception Score of
  OpenAI's improved-GAN code and of the ADM evaluator uses. Every batch has the same shape (the last
  one is padded), so a run compiles once; `batch_size` is capped at N.
  """
  check_images(images)
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  n = images.shape[0]
  b = min(batch_size, n)
  fn = _features_fn(precision)
  xp = jnp if isinstance(images, jax.Array) else np
  parts, pending = [], None
  for start in range(0, n, b):
    chunk = images[start:start + b]
    m = chunk.shape[0]
    if m < b:
      chunk = xp.concatenate([chunk, xp.zeros((b - m,) + tuple(chunk.shape[1:]), chunk.dtype)])
    out = fn(params, chunk)
    # Fetch the previous batch only after this one is dispatched, so the device never waits on the host.
    if pending is not None:
      parts.append(jax.tree_util.tree_map(np.asarray, pending[0]))
    pending = (out, m)
  parts.append(jax.tree_util.tree_map(lambda a: np.asarray(a)[:pending[1]], pending[0]))
  result = {k: np.concatenate([p[k] for p in parts]) for k in ('pool3', 'logits')}
  bias = np.asarray(params['fc']['bias'], np.float32)
  result['logits_unbiased'] = result['logits'] - bias
  return result
