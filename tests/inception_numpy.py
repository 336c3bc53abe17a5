"""An independent float64 NumPy transcription of pytorch-fid's FID InceptionV3 forward, for tests.

It reads the *PyTorch-layout* state dict (NCHW, OIHW) and writes every operator from its PyTorch
definition (convolution as a sum over windows, count_include_pad=False averages, -inf-padded max
pools, bilinear resize per output pixel), so it shares no code with the Flax port, its converter or
srdd_jax.tokenizer.resample.
"""
import functools
import math

import numpy as np


def _bilinear_1d(n_in, n_out):
  """(index0, index1, lambda) per output pixel of PyTorch's upsample_bilinear2d, align_corners=False."""
  i0s, i1s, lams = [], [], []
  for o in range(n_out):
    src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = min(math.floor(src), n_in - 1)
    i1 = i0 + 1 if i0 < n_in - 1 else i0
    i0s.append(i0)
    i1s.append(i1)
    lams.append(src - i0)
  return np.array(i0s), np.array(i1s), np.array(lams)


def resize_bilinear(x, out):
  """NCHW float64 -> NCHW (out, out)."""
  h0, h1, lh = _bilinear_1d(x.shape[2], out)
  x = x[:, :, h0, :] * (1 - lh)[None, None, :, None] + x[:, :, h1, :] * lh[None, None, :, None]
  w0, w1, lw = _bilinear_1d(x.shape[3], out)
  return x[:, :, :, w0] * (1 - lw) + x[:, :, :, w1] * lw


def _windows(x, kh, kw, stride):
  """NCHW -> (N, C, Ho, Wo, kh, kw) view of every window."""
  v = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
  return v[:, :, ::stride, ::stride]


def conv2d(x, w, stride=1, pad=(0, 0)):
  ph, pw = pad
  x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
  win = _windows(x, w.shape[2], w.shape[3], stride)  # (N, C, Ho, Wo, kh, kw)
  n, c, ho, wo, kh, kw = win.shape
  cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)
  y = cols @ w.reshape(w.shape[0], -1).T
  return y.reshape(n, ho, wo, -1).transpose(0, 3, 1, 2)


def avg_pool_3x3_exclude_pad(x):
  ones = np.pad(np.ones(x.shape[2:]), 1)
  counts = _windows(ones[None, None], 3, 3, 1).sum(axis=(-1, -2))
  sums = _windows(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), 3, 3, 1).sum(axis=(-1, -2))
  return sums / counts


def max_pool_3x3(x, stride, pad):
  if pad:
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
  return _windows(x, 3, 3, stride).max(axis=(-1, -2))


class _Net:

  def __init__(self, sd):
    self.sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}

  def basic(self, name, x, stride=1, pad=(0, 0)):
    sd = self.sd
    y = conv2d(x, sd[f'{name}.conv.weight'], stride, pad)
    bn = lambda k: sd[f'{name}.bn.{k}'][None, :, None, None]
    y = (y - bn('running_mean')) / np.sqrt(bn('running_var') + 1e-3) * bn('weight') + bn('bias')
    return np.maximum(y, 0)

  def block_a(self, n, x):
    b1 = self.basic(f'{n}.branch1x1', x)
    b5 = self.basic(f'{n}.branch5x5_2', self.basic(f'{n}.branch5x5_1', x), pad=(2, 2))
    b3 = self.basic(f'{n}.branch3x3dbl_1', x)
    b3 = self.basic(f'{n}.branch3x3dbl_2', b3, pad=(1, 1))
    b3 = self.basic(f'{n}.branch3x3dbl_3', b3, pad=(1, 1))
    bp = self.basic(f'{n}.branch_pool', avg_pool_3x3_exclude_pad(x))
    return np.concatenate([b1, b5, b3, bp], axis=1)

  def block_b(self, n, x):
    b3 = self.basic(f'{n}.branch3x3', x, stride=2)
    bd = self.basic(f'{n}.branch3x3dbl_1', x)
    bd = self.basic(f'{n}.branch3x3dbl_2', bd, pad=(1, 1))
    bd = self.basic(f'{n}.branch3x3dbl_3', bd, stride=2)
    return np.concatenate([b3, bd, max_pool_3x3(x, 2, 0)], axis=1)

  def block_c(self, n, x):
    b1 = self.basic(f'{n}.branch1x1', x)
    b7 = self.basic(f'{n}.branch7x7_1', x)
    b7 = self.basic(f'{n}.branch7x7_2', b7, pad=(0, 3))
    b7 = self.basic(f'{n}.branch7x7_3', b7, pad=(3, 0))
    bd = self.basic(f'{n}.branch7x7dbl_1', x)
    for i, pad in ((2, (3, 0)), (3, (0, 3)), (4, (3, 0)), (5, (0, 3))):
      bd = self.basic(f'{n}.branch7x7dbl_{i}', bd, pad=pad)
    bp = self.basic(f'{n}.branch_pool', avg_pool_3x3_exclude_pad(x))
    return np.concatenate([b1, b7, bd, bp], axis=1)

  def block_d(self, n, x):
    b3 = self.basic(f'{n}.branch3x3_2', self.basic(f'{n}.branch3x3_1', x), stride=2)
    b7 = self.basic(f'{n}.branch7x7x3_1', x)
    b7 = self.basic(f'{n}.branch7x7x3_2', b7, pad=(0, 3))
    b7 = self.basic(f'{n}.branch7x7x3_3', b7, pad=(3, 0))
    b7 = self.basic(f'{n}.branch7x7x3_4', b7, stride=2)
    return np.concatenate([b3, b7, max_pool_3x3(x, 2, 0)], axis=1)

  def block_e(self, n, x, max_pool):
    b1 = self.basic(f'{n}.branch1x1', x)
    b3 = self.basic(f'{n}.branch3x3_1', x)
    b3 = np.concatenate([self.basic(f'{n}.branch3x3_2a', b3, pad=(0, 1)),
                         self.basic(f'{n}.branch3x3_2b', b3, pad=(1, 0))], axis=1)
    bd = self.basic(f'{n}.branch3x3dbl_1', x)
    bd = self.basic(f'{n}.branch3x3dbl_2', bd, pad=(1, 1))
    bd = np.concatenate([self.basic(f'{n}.branch3x3dbl_3a', bd, pad=(0, 1)),
                         self.basic(f'{n}.branch3x3dbl_3b', bd, pad=(1, 0))], axis=1)
    pooled = max_pool_3x3(x, 1, 1) if max_pool else avg_pool_3x3_exclude_pad(x)
    bp = self.basic(f'{n}.branch_pool', pooled)
    return np.concatenate([b1, b3, bd, bp], axis=1)

  def forward(self, images01):
    x = 2 * resize_bilinear(np.asarray(images01, np.float64), 299) - 1
    x = self.basic('Conv2d_1a_3x3', x, stride=2)
    x = self.basic('Conv2d_2a_3x3', x)
    x = self.basic('Conv2d_2b_3x3', x, pad=(1, 1))
    x = max_pool_3x3(x, 2, 0)
    x = self.basic('Conv2d_3b_1x1', x)
    x = self.basic('Conv2d_4a_3x3', x)
    x = max_pool_3x3(x, 2, 0)
    for n in ('Mixed_5b', 'Mixed_5c', 'Mixed_5d'):
      x = self.block_a(n, x)
    x = self.block_b('Mixed_6a', x)
    for n in ('Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e'):
      x = self.block_c(n, x)
    x = self.block_d('Mixed_7a', x)
    x = self.block_e('Mixed_7b', x, max_pool=False)
    x = self.block_e('Mixed_7c', x, max_pool=True)
    pool3 = x.mean(axis=(2, 3))
    logits = pool3 @ self.sd['fc.weight'].T + self.sd['fc.bias']
    return pool3, logits


def inception_forward(sd, images01_nchw):
  """pool3 (N, 2048) and logits (N, 1008), float64, of NCHW images in [0, 1] (any size)."""
  net = _Net(sd)
  outs = [net.forward(images01_nchw[i:i + 1]) for i in range(len(images01_nchw))]
  return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def structured_images(size=128):
  """Three NCHW images in [0, 1] that differ in layout, not only in noise (gradients, waves, a skewed
  noise field), so their Inception features differ substantially."""
  yy, xx = np.mgrid[0:size, 0:size] / (size - 1.0)
  noise = np.random.default_rng(size).uniform(0, 1, (3, size, size)) ** 3
  return np.stack([
      np.stack([xx, yy, np.full_like(xx, 0.5)]),
      np.stack([0.5 + 0.5 * np.sin(12 * xx) * np.cos(9 * yy), 1 - xx, yy * xx]),
      noise,
  ]).astype(np.float32)


def rerandomised_weights(reference_state, seed=11):
  """A new float16 FID Inception state dict drawn from the reference one: every tensor's entries
  permuted, conv kernels scaled by sqrt(6) (the reference's uniform(±1/sqrt(fan_in)) becomes He-scaled,
  so the signal of the image survives to pool3), BatchNorm scales multiplied by U(0.7, 1.3)."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, v in sorted(reference_state.items()):
    if v.dtype == np.float16:
      v = rng.permutation(v.reshape(-1)).reshape(v.shape).astype(np.float32)
      if k.endswith('.conv.weight'):
        v = v * np.sqrt(6.0)
      elif k.endswith('.bn.weight'):
        v = v * rng.uniform(0.7, 1.3, v.shape)
      v = v.astype(np.float16)
    out[k] = v
  return out


@functools.lru_cache(maxsize=None)
def generated_case(reference_path):
  """(weights with `inception/` keys, NCHW images, pool3, logits) of a file "of the reference format"
  with batch 3 and 128 px images; computed once per test session."""
  with np.load(reference_path) as z:
    state = {k[len('inception/'):]: z[k] for k in z.files if k.startswith('inception/')}
  weights = rerandomised_weights(state)
  images = structured_images(128)
  pool3, logits = inception_forward(weights, images)
  return {'inception/' + k: v for k, v in weights.items()}, images, pool3, logits
