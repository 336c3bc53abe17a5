"""PyTorch-exact resampling of latent maps, as precomputed separable matrices.

The tokens of the multi-scale quantizer depend on the exact interpolation weights, so we reproduce
`torch.nn.functional.interpolate(mode='area')` (adaptive average pooling) and
`mode='bicubic', align_corners=False` (cubic convolution with A = -0.75, clamped taps) bit-for-bit in
float64 and apply them as X' = A X A^T. `jax.image.resize` uses other kernels and does not match.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

_BICUBIC_A = -0.75  # PyTorch's cubic coefficient; jax.image uses -0.5.


@functools.lru_cache(maxsize=None)
def area_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of adaptive average pooling; windows overlap when in/out is not an integer."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f'area resampling needs positive sizes, got in={in_size}, out={out_size}')
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil((i+1)*in/out) in integers.
    m[i, start:end] = 1.0 / (end - start)
  m.flags.writeable = False
  return m


def _cubic_weights(t: float) -> tuple[float, float, float, float]:
  a = _BICUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return far(t + 1), near(t), near(1 - t), far(2 - t)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of PyTorch bicubic interpolation with align_corners=False."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f'bicubic resampling needs positive sizes, got in={in_size}, out={out_size}')
  m = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for o in range(out_size):
    # Unlike linear modes, PyTorch does not clamp the source coordinate at 0 for cubic.
    src = (o + 0.5) * scale - 0.5
    base = int(np.floor(src))
    weights = _cubic_weights(src - base)
    for tap, w in enumerate(weights):
      m[o, min(max(base - 1 + tap, 0), in_size - 1)] += w
  m.flags.writeable = False
  return m


def _apply_separable(x: jax.Array, mh: np.ndarray, mw: np.ndarray) -> jax.Array:
  """x: (B, H, W, C) -> (B, H', W', C) with out[i, j] = sum_hw mh[i, h] mw[j, w] x[h, w]."""
  dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  mh = jnp.asarray(mh, dtype)
  mw = jnp.asarray(mw, dtype)
  hp = jax.lax.Precision.HIGHEST
  y = jnp.einsum('ih,bhwc->biwc', mh, x, precision=hp)
  return jnp.einsum('jw,biwc->bijc', mw, y, precision=hp)


def _check_nhwc(x, name):
  if x.ndim != 4:
    raise ValueError(f'{name} expects an NHWC array of rank 4, got shape {tuple(x.shape)}')


@functools.lru_cache(maxsize=None)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of PyTorch bilinear interpolation, align_corners=False, no antialiasing."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f'bilinear resampling needs positive sizes, got in={in_size}, out={out_size}')
  m = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for o in range(out_size):
    src = max((o + 0.5) * scale - 0.5, 0.0)  # Linear modes clamp the source coordinate at 0.
    i0 = min(int(np.floor(src)), in_size - 1)
    i1 = min(i0 + 1, in_size - 1)
    lam = min(max(src - i0, 0.0), 1.0)
    m[o, i0] += 1.0 - lam
    m[o, i1] += lam
  m.flags.writeable = False
  return m


def _resize(x, size, matrix, name):
  _check_nhwc(x, name)
  oh, ow = (size, size) if isinstance(size, int) else size
  h, w = x.shape[1], x.shape[2]
  if (oh, ow) == (h, w):
    # Same size is the identity in all three modes (cubic weights (0, 1, 0, 0), zero lerp, 1-cell windows).
    return x
  return _apply_separable(x, matrix(h, oh), matrix(w, ow))


def area_resize(x: jax.Array, size: int | tuple[int, int]) -> jax.Array:
  """`F.interpolate(x, size, mode='area')` for NHWC `x`."""
  return _resize(x, size, area_matrix, 'area_resize')


def bicubic_resize(x: jax.Array, size: int | tuple[int, int]) -> jax.Array:
  """`F.interpolate(x, size, mode='bicubic', align_corners=False)` for NHWC `x`."""
  return _resize(x, size, bicubic_matrix, 'bicubic_resize')


def bilinear_resize(x: jax.Array, size: int | tuple[int, int]) -> jax.Array:
  """`F.interpolate(x, size, mode='bilinear', align_corners=False)` for NHWC `x`."""
  return _resize(x, size, bilinear_matrix, 'bilinear_resize')
