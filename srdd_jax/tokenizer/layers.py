"""Building blocks of VAR's VQ-VAE (the latent-diffusion vq-f16 design) in Flax Linen, NHWC.

Every parameter carries logical axis names so the mesh rules of a config can shard it. Module names
mirror the PyTorch state-dict names (`norm1`, `conv1`, `nin_shortcut`, `qkv`, `proj_out`, ...) so the
converter maps keys by a fixed rule.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's default Conv2d init (kaiming-uniform with a=sqrt(5)) is uniform(+-1/sqrt(fan_in)) for the
# kernel and the bias alike; VAR's VQ-VAE keeps it, so we do too.
_torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')

Precision = Any


def _torch_bias_init(fan_in: int):
  bound = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv_params(module: nn.Module, cin: int, features: int, k: int):
  """Creates `kernel` (HWIO) and `bias` on `module`, initialised like PyTorch's Conv2d."""
  kernel = module.param(
      'kernel', nn.with_logical_partitioning(_torch_kernel_init, (None, None, 'conv_in', 'conv_out')),
      (k, k, cin, features), jnp.float32)
  bias = module.param(
      'bias', nn.with_logical_partitioning(_torch_bias_init(cin * k * k), ('conv_out',)),
      (features,), jnp.float32)
  return kernel, bias


def conv2d(x, kernel, bias, stride=1, padding='torch', precision=None):
  """Cross-correlation like PyTorch's Conv2d; 'torch' padding is symmetric (k-1)//2."""
  k = kernel.shape[0]
  if padding == 'torch':
    padding = (((k - 1) // 2,) * 2,) * 2
  y = jax.lax.conv_general_dilated(
      x, kernel.astype(x.dtype), (stride, stride), padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=precision)
  return y + bias.astype(x.dtype)


class Conv(nn.Module):
  """Conv2d with PyTorch's padding semantics and init; kernel HWIO."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: Any = 'torch'  # 'torch' = symmetric (k-1)//2, or explicit ((top, bottom), (left, right)).
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    kernel, bias = conv_params(self, x.shape[-1], self.features, self.kernel_size)
    return conv2d(x, kernel, bias, self.stride, self.padding, self.precision)


class GroupNorm(nn.Module):
  """GroupNorm(32, eps=1e-6) computed in float32 with the two-pass variance, like PyTorch."""
  num_groups: int = 32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f'GroupNorm: {c} channels are not divisible by {self.num_groups} groups')
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (c,), jnp.float32)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)),
                      (c,), jnp.float32)
    dtype = x.dtype
    xg = x.astype(jnp.float32).reshape(x.shape[:-1] + (self.num_groups, c // self.num_groups))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    return (y * scale + bias).astype(dtype)


class ResnetBlock(nn.Module):
  out_channels: int
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    h = Conv(self.out_channels, 3, name='conv1', precision=self.precision)(
        nn.silu(GroupNorm(name='norm1')(x)))
    h = Conv(self.out_channels, 3, name='conv2', precision=self.precision)(
        nn.silu(GroupNorm(name='norm2')(h)))
    if x.shape[-1] != self.out_channels:
      x = Conv(self.out_channels, 1, name='nin_shortcut', precision=self.precision)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention with a fused [q|k|v] 1x1 conv, scale C^-1/2, residual."""
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    qkv = Conv(3 * c, 1, name='qkv', precision=self.precision)(GroupNorm(name='norm')(x))
    q, k, v = jnp.split(qkv.reshape(b, hh * ww, 3 * c), 3, axis=-1)
    w = jnp.einsum('bqc,bkc->bqk', q, k, precision=self.precision) * (c ** -0.5)
    w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
    h = jnp.einsum('bqk,bkc->bqc', w, v, precision=self.precision).reshape(b, hh, ww, c)
    return x + Conv(c, 1, name='proj_out', precision=self.precision)(h)


class Downsample(nn.Module):
  """Pad right/bottom by one, then a stride-2 3x3 conv with no other padding (VAR's Downsample2x)."""
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    return Conv(x.shape[-1], 3, stride=2, padding=((0, 1), (0, 1)), name='conv',
                precision=self.precision)(x)


class Upsample(nn.Module):
  """Nearest x2 then a 3x3 conv (VAR's Upsample2x)."""
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return Conv(x.shape[-1], 3, name='conv', precision=self.precision)(x)
