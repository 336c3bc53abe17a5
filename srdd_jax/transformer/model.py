"""VAR's transformer in Flax Linen (SPEC §2), with the causal and markov masks.

Parameter names mirror the PyTorch state dict (`blocks.3.attn.mat_qkv.weight` is
`blocks_3/attn/mat_qkv/kernel`, `blocks.3.ada_lin.1.weight` is `blocks_3/ada_lin_1/kernel`), and the
odd-shaped parameters keep VAR's shapes (`pos_1LC` (1, L, C), `scale_mul_1H11` (1, H, 1, 1),
`ada_gss` (1, 1, 6, C)), so `srdd_jax.convert` maps checkpoints by its one generic rule.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax.transformer import attention
from srdd_jax.transformer.config import VARConfig


def trunc_normal(std: float, scale: float = 1.0):
  """PyTorch's trunc_normal_(std) (cut at +-2 absolute, not +-2 std), times `scale`."""
  def init(key, shape, dtype=jnp.float32):
    return scale * std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype)
  return init


def _column_scaled(base, scales_fn):
  """Kernel init whose output columns are multiplied by `scales_fn(n_out)` (VAR's AdaLN init)."""
  def init(key, shape, dtype=jnp.float32):
    return base(key, shape, dtype) * jnp.asarray(scales_fn(shape[-1]), dtype)
  return init


def layer_norm(x, eps):
  """LayerNorm without affine, in float32 with the two-pass variance (like PyTorch)."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


class Dense(nn.Module):
  """x @ kernel + bias with the kernel in (in, out) layout; matmul in `dtype`, output float32."""
  features: int
  names: tuple[str | None, str | None]
  kernel_init: object
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, self.names),
                        (x.shape[-1], self.features), jnp.float32)
    y = jnp.einsum('...i,io->...o', x.astype(self.dtype), kernel.astype(self.dtype),
                   preferred_element_type=jnp.float32)
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, self.names[1:]),
                        (self.features,), jnp.float32)
      y = y + bias
    return y


class Embed(nn.Module):
  num: int
  features: int
  names: tuple[str | None, str | None]
  std: float

  @nn.compact
  def __call__(self, ids):
    table = self.param('embedding', nn.with_logical_partitioning(trunc_normal(self.std), self.names),
                       (self.num, self.features), jnp.float32)
    return jnp.take(table, ids, axis=0)


class SelfAttention(nn.Module):
  config: VARConfig

  @nn.compact
  def __call__(self, x, mask_kind: str, begin_ends=None, mask=None, cache=None, cache_index: int = 0):
    """Self-attention of x (B, l, C). With `cache` = (k, v), each (B, L, H, D) preallocated, the keys
    and values of x are written at [cache_index, cache_index + l) and the queries attend to the whole
    prefix [0, cache_index + l) (VAR's causal inference); returns (out, cache) then."""
    c = self.config
    dt = jnp.dtype(c.dtype)
    b, l, width = x.shape
    h, hd = c.num_heads, c.head_dim
    qkv = Dense(3 * width, ('embed', 'heads'), trunc_normal(c.std), use_bias=False, dtype=dt,
                name='mat_qkv')(x)
    q_bias = self.param('q_bias', nn.with_logical_partitioning(nn.initializers.zeros, ('heads',)),
                        (width,), jnp.float32)
    v_bias = self.param('v_bias', nn.with_logical_partitioning(nn.initializers.zeros, ('heads',)),
                        (width,), jnp.float32)
    # VAR's bias is cat(q_bias, zero_k_bias, v_bias): keys carry no bias.
    qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias])
    q, k, v = jnp.moveaxis(qkv.reshape(b, l, 3, h, hd), 2, 0)
    if c.attn_l2_norm:
      s = self.param('scale_mul_1H11',
                     nn.with_logical_partitioning(nn.initializers.constant(math.log(4.0)),
                                                  (None, 'heads', None, None)),
                     (1, h, 1, 1), jnp.float32)
      scale_mul = jnp.exp(jnp.minimum(s, math.log(100.0))).reshape(1, 1, h, 1)
      q = _l2_normalize(q) * scale_mul
      k = _l2_normalize(k)
      scale = 1.0
    else:
      scale = 0.25 / math.sqrt(hd)
    if cache is not None:
      end = cache_index + l
      k_cache = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), cache_index, 1)
      v_cache = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), cache_index, 1)
      o = attention.attend(q, k_cache[:, :end], v_cache[:, :end], scale=scale, dtype=dt, impl=c.attention)
      cache = (k_cache, v_cache)
    elif mask_kind == 'markov' and begin_ends is not None and len(begin_ends) == 1:  # One scale alone.
      o = attention.attend(q, k, v, scale=scale, dtype=dt, impl=c.attention)
    else:
      o = attention.sequence_attention(q, k, v, scale=scale, patch_nums=c.patch_nums, mask=mask_kind,
                                       dtype=dt, impl=c.attention)
    o = o.reshape(b, l, width)
    o = Dense(width, ('heads', 'embed'), trunc_normal(c.std, 1 / math.sqrt(2 * c.depth)), dtype=dt,
              name='proj')(o)
    return o if cache is None else (o, cache)


def _l2_normalize(x, eps=1e-12):
  """F.normalize: x / max(||x||, eps), in float32."""
  x = x.astype(jnp.float32)
  n = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(n, eps)


class FFN(nn.Module):
  config: VARConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    dt = jnp.dtype(c.dtype)
    h = Dense(c.mlp_dim, ('embed', 'mlp'), trunc_normal(c.std), dtype=dt, name='fc1')(x)
    h = jax.nn.gelu(h, approximate=True)
    return Dense(c.width, ('mlp', 'embed'), trunc_normal(c.std, 1 / math.sqrt(2 * c.depth)), dtype=dt,
                 name='fc2')(h)


def _adaln_scales(c: VARConfig, n_out: int):
  # Output rows [gamma1, gamma2, scale1, scale2, shift1, shift2]: gammas x init_adaln_gamma.
  cols = np.full(n_out, c.init_adaln, np.float32)
  cols[:2 * c.width] = c.init_adaln_gamma
  return cols


class AdaLNSelfAttn(nn.Module):
  config: VARConfig
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x, cond, train: bool, mask_kind: str, begin_ends=None, mask=None, cache=None,
               cache_index: int = 0):
    c = self.config
    width = c.width
    if c.shared_aln:
      def gss_init(key, shape, dtype=jnp.float32):
        g = jax.random.normal(key, shape, dtype) / math.sqrt(width)
        return g * jnp.asarray([c.init_adaln_gamma] * 2 + [c.init_adaln] * 4, dtype)[:, None]
      gss = self.param('ada_gss', nn.with_logical_partitioning(gss_init, (None, None, None, 'embed')),
                       (1, 1, 6, width), jnp.float32)
      mods = gss + cond  # cond: (B, 1, 6, C) from the shared AdaLN.
    else:
      mods = Dense(6 * width, ('embed', 'adaln'),
                   _column_scaled(trunc_normal(c.std), lambda n: _adaln_scales(c, n)),
                   dtype=jnp.dtype(c.dtype), name='ada_lin_1')(nn.silu(cond))
      mods = mods.reshape(-1, 1, 6, width)
    g1, g2, s1, s2, b1, b2 = (mods[:, :, i] for i in range(6))
    h = SelfAttention(c, name='attn')(layer_norm(x, c.norm_eps) * (1 + s1) + b1, mask_kind, begin_ends,
                                      mask, cache, cache_index)
    if cache is not None:
      h, cache = h
    x = x + self._drop_path(h * g1, train)
    h = FFN(c, name='ffn')(layer_norm(x, c.norm_eps) * (1 + s2) + b2)
    x = x + self._drop_path(h * g2, train)
    return x if cache is None else (x, cache)

  def _drop_path(self, h, train):
    if not train or self.drop_path <= 0:
      return h
    keep = 1.0 - self.drop_path
    m = jax.random.bernoulli(self.make_rng('dropout'), keep, (h.shape[0],) + (1,) * (h.ndim - 1))
    return jnp.where(m, h / keep, 0.0)


class AdaLNBeforeHead(nn.Module):
  config: VARConfig

  @nn.compact
  def __call__(self, x, cond):
    c = self.config
    mods = Dense(2 * c.width, ('embed', 'adaln'), trunc_normal(c.std, c.init_adaln), name='ada_lin_1')(
        nn.silu(cond)).reshape(-1, 1, 2, c.width)
    return layer_norm(x, c.norm_eps) * (1 + mods[:, :, 0]) + mods[:, :, 1]


class VAR(nn.Module):
  """Logits (B, L, V) of every scale's tokens from the class label and the teacher-forcing input."""
  config: VARConfig

  def setup(self):
    c = self.config
    width = c.width
    self.word_embed = Dense(width, (None, 'embed'), trunc_normal(c.std))
    self.class_emb = Embed(c.num_classes + 1, width, ('classes', 'embed'), c.std)
    self.pos_start = self.param('pos_start', nn.with_logical_partitioning(
        trunc_normal(c.std), (None, None, 'embed')), (1, c.first_l, width), jnp.float32)
    self.pos_1LC = self.param('pos_1LC', nn.with_logical_partitioning(
        trunc_normal(c.std), (None, None, 'embed')), (1, c.seq_len, width), jnp.float32)
    self.lvl_embed = Embed(c.num_scales, width, (None, 'embed'), c.std)
    if c.shared_aln:
      self.shared_ada_lin_1 = Dense(6 * width, ('embed', 'adaln'), trunc_normal(c.std))
    dpr = np.linspace(0, c.drop_path_rate, c.depth)
    self.blocks = [AdaLNSelfAttn(c, float(dpr[i])) for i in range(c.depth)]
    self.head_nm = AdaLNBeforeHead(c)
    self.head = Dense(c.vocab_size, ('embed', 'vocab'), trunc_normal(c.std, c.init_head))

  # --- pieces, shared with the sampler ----------------------------------------------------------

  def condition(self, labels):
    """Class embedding: the AdaLN condition and the start token (labels == num_classes: null)."""
    return self.class_emb(labels)

  def block_condition(self, cond):
    if self.config.shared_aln:
      return self.shared_ada_lin_1(nn.silu(cond)).reshape(-1, 1, 6, self.config.width)
    return cond

  def embed_scale(self, cond, x_scale, si: int):
    """Input tokens of scale `si`: the start token for si = 0, else word_embed of its f_hat input."""
    c = self.config
    b, e = c.begin_ends[si]
    if si == 0:
      x = cond[:, None, :] + self.pos_start
    else:
      x = self.word_embed(x_scale.astype(jnp.float32))
    return x + self.lvl_embed(jnp.asarray(si)) + self.pos_1LC[:, b:e]

  def run_blocks(self, x, cond, train: bool, mask_kind: str, begin_ends=None, mask=None, caches=None,
                 cache_index: int = 0):
    """The block stack; with `caches` (one (k, v) pair per block) returns (x, updated caches)."""
    bc = self.block_condition(cond)
    if caches is None:
      for blk in self.blocks:
        x = blk(x, bc, train, mask_kind, begin_ends, mask)
      return x
    new = []
    for blk, cache in zip(self.blocks, caches):
      x, cache = blk(x, bc, train, mask_kind, begin_ends, mask, cache, cache_index)
      new.append(cache)
    return x, new

  def scale_logits(self, cond, x_scale, si: int, caches=None):
    """Inference for one scale: logits (B, pn_si^2, V) from its input alone (markov: no cache, the
    scale attends to itself) or with the KV cache of the coarser scales (causal); returns
    (logits, caches)."""
    x = self.embed_scale(cond, x_scale, si)
    if caches is None:
      x = self.run_blocks(x, cond, False, 'markov', begin_ends=((0, x.shape[1]),))
    else:
      x, caches = self.run_blocks(x, cond, False, 'causal', caches=caches,
                                  cache_index=self.config.begin_ends[si][0])
    return self.logits(x, cond), caches

  def logits(self, x, cond):
    return self.head(self.head_nm(x.astype(jnp.float32), cond))

  # --- the training forward ---------------------------------------------------------------------

  def __call__(self, labels, x_in, train: bool = False):
    """labels (B,) int, x_in (B, L-1, Cvae) -> logits (B, L, V) float32."""
    c = self.config
    if train and c.cond_drop_rate > 0:
      drop = jax.random.uniform(self.make_rng('dropout'), labels.shape) < c.cond_drop_rate
      labels = jnp.where(drop, c.num_classes, labels)
    cond = self.condition(labels)
    x = jnp.concatenate(
        [self.embed_scale(cond, None, 0)] +
        [self.embed_scale(cond, x_in[:, b - c.first_l:e - c.first_l], si)
         for si, (b, e) in enumerate(c.begin_ends) if si > 0], axis=1)
    if c.mask == 'markov':
      x = self.run_blocks(x, cond, train, 'markov', begin_ends=c.begin_ends)
    else:
      x = self.run_blocks(x, cond, train, 'causal')
    return self.logits(x, cond)
