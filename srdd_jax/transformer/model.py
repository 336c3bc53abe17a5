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

from srdd_jax.parallel.mesh import constrain
from srdd_jax.transformer import attention, cpu_kernels
from srdd_jax.transformer.config import VARConfig

# Activation layouts by logical axis (mapped to the mesh by the `activation_*` rules while training).
_ACT = ('activation_batch', 'activation_length', 'activation_embed')
_ACT_HEADS = ('activation_batch', 'activation_length', 'activation_heads', None)
_ACT_MLP = ('activation_batch', 'activation_length', 'activation_mlp')
_ACT_VOCAB = ('activation_batch', 'activation_length', 'activation_vocab')
_REMAT_POLICIES = {
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # The weight matmuls.
    'full': None,  # Nothing saved: the block is recomputed from its input.
}


def _cpu(c: VARConfig) -> dict:
  """Dense's CPU switches from the config."""
  return {'cpu_kernels': c.cpu_kernels, 'cpu_matmul': c.cpu_matmul}


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
  """x @ kernel + bias with the kernel in (in, out) layout; matmul in `dtype` (accumulated in float32),
  output in `out_dtype` (default `dtype`: like autocast, a bfloat16 model keeps bfloat16 activations,
  which halves their memory and traffic; the residual stream, norms and softmax stay float32).
  `cpu_kernels`, `cpu_matmul`: VARConfig's (on a CPU: cpu_kernels.matmul's weight gradient, and a float32
  matmul's products in bfloat16 if asked)."""
  features: int
  names: tuple[str | None, str | None]
  kernel_init: object
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  out_dtype: jnp.dtype | None = None
  cpu_kernels: bool = True
  cpu_matmul: str = 'float32'

  @nn.compact
  def __call__(self, x):
    out = self.out_dtype or self.dtype
    kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, self.names),
                        (x.shape[-1], self.features), jnp.float32)
    # cpu_matmul applies to float32 matmuls; a bfloat16 model's are bfloat16 anyway.
    cpu_dtype = cpu_kernels.cpu_matmul_dtype(self.cpu_matmul) if jnp.dtype(self.dtype) == jnp.float32 else None
    y = cpu_kernels.matmul(x.astype(self.dtype), kernel.astype(self.dtype), jnp.dtype(out), self.cpu_kernels,
                           cpu_dtype)
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, self.names[1:]),
                        (self.features,), jnp.float32)
      y = y + bias.astype(out)
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
  def __call__(self, x, mask_kind: str, begin_ends=None, cache=None, cache_index: int = 0):
    """Self-attention of x (B, l, C). With `cache` = (k, v), each (B, L, H, D) preallocated, the keys
    and values of x are written at [cache_index, cache_index + l) and the queries attend to the whole
    prefix [0, cache_index + l) (VAR's causal inference); returns (out, cache) then."""
    c = self.config
    dt = jnp.dtype(c.dtype)
    b, l, width = x.shape
    h, hd = c.num_heads, c.head_dim
    qkv = Dense(3 * width, ('embed', 'heads'), trunc_normal(c.std), use_bias=False, dtype=dt,
                **_cpu(c), name='mat_qkv')(x)
    q_bias = self.param('q_bias', nn.with_logical_partitioning(nn.initializers.zeros, ('heads',)),
                        (width,), jnp.float32)
    v_bias = self.param('v_bias', nn.with_logical_partitioning(nn.initializers.zeros, ('heads',)),
                        (width,), jnp.float32)
    # VAR's bias is cat(q_bias, zero_k_bias, v_bias): keys carry no bias.
    bias = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias])
    if c.attn_l2_norm:
      s = self.param('scale_mul_1H11',
                     nn.with_logical_partitioning(nn.initializers.constant(math.log(4.0)),
                                                  (None, 'heads', None, None)),
                     (1, h, 1, 1), jnp.float32)
      scale_mul, scale = jnp.exp(jnp.minimum(s, math.log(100.0))).reshape(h), 1.0
    else:
      scale_mul, scale = jnp.ones((h,), jnp.float32), 0.25 / math.sqrt(hd)
    one_scale = mask_kind == 'markov' and begin_ends is not None and len(begin_ends) == 1
    # The scales present: all of them, or the first few when progressive training cuts the sequence.
    pn = c.patch_nums if begin_ends is None else c.patch_nums[:len(begin_ends)]

    def whole_sequence(qkv, bias, scale_mul):  # Training: autodiff's path, and every backend's but the CPU's.
      q, k, v = _split_heads(qkv, bias, scale_mul, c)
      o = attention.sequence_attention(q, k, v, scale=scale, patch_nums=pn, mask=mask_kind, dtype=dt,
                                       impl=c.attention)
      return o.reshape(b, l, width)

    if cache is not None:
      q, k, v = _split_heads(qkv, bias, scale_mul, c)
      end = cache_index + l
      k_cache = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), cache_index, 1)
      v_cache = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), cache_index, 1)
      o = attention.attend(q, k_cache[:, :end], v_cache[:, :end], scale=scale, dtype=dt, impl=c.attention)
      cache = (k_cache, v_cache)
    elif one_scale:
      o = attention.attend(*_split_heads(qkv, bias, scale_mul, c), scale=scale, dtype=dt, impl=c.attention)
    elif attention.resolve_impl(c.attention, dt) == 'xla':
      o = cpu_kernels.self_attention(qkv, bias, scale_mul, whole_sequence, heads=h, patch_nums=pn,
                                     mask=mask_kind, scale=scale, l2_norm=c.attn_l2_norm, dtype=dt,
                                     cpu_kernels=c.cpu_kernels)
    else:
      o = whole_sequence(qkv, bias, scale_mul)
    o = o.reshape(b, l, width)
    o = Dense(width, ('heads', 'embed'), trunc_normal(c.std, 1 / math.sqrt(2 * c.depth)), dtype=dt,
              **_cpu(c), name='proj')(o)
    return o if cache is None else (o, cache)


def _split_heads(qkv, bias, scale_mul, c: VARConfig):
  """q, k, v (B, l, H, D) from the projection (B, l, 3C): bias added (in the compute dtype); with
  attn_l2_norm, q and k l2-normalised (float32) and q scaled by scale_mul (H,)."""
  b, l, _ = qkv.shape
  qkv = qkv + bias.astype(qkv.dtype)
  q, k, v = (constrain(t, _ACT_HEADS) for t in jnp.moveaxis(qkv.reshape(b, l, 3, c.num_heads, c.head_dim), 2, 0))
  if c.attn_l2_norm:
    q = _l2_normalize(q) * scale_mul.reshape(1, 1, -1, 1)
    k = _l2_normalize(k)
  return q, k, v


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
    h = Dense(c.mlp_dim, ('embed', 'mlp'), trunc_normal(c.std), dtype=dt, **_cpu(c),
              name='fc1')(x)
    h = constrain(cpu_kernels.gelu(h, c.cpu_kernels), _ACT_MLP)
    return Dense(c.width, ('mlp', 'embed'), trunc_normal(c.std, 1 / math.sqrt(2 * c.depth)), dtype=dt,
                 **_cpu(c), name='fc2')(h)


def _adaln_scales(c: VARConfig, n_out: int):
  # Output rows [gamma1, gamma2, scale1, scale2, shift1, shift2]: gammas x init_adaln_gamma.
  cols = np.full(n_out, c.init_adaln, np.float32)
  cols[:2 * c.width] = c.init_adaln_gamma
  return cols


class AdaLNSelfAttn(nn.Module):
  """One block. `drop_rate` (its drop-path rate) is an argument so that a scan over stacked blocks can
  feed each layer its own; the trailing arguments are static (Python values), the same for every
  layer. Returns (x, cache); cache is None without a KV cache."""
  config: VARConfig

  @nn.compact
  def __call__(self, x, cond, drop_rate, cache, train: bool, mask_kind: str, begin_ends=None,
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
                   dtype=jnp.dtype(c.dtype), **_cpu(c), name='ada_lin_1')(nn.silu(cond))
      mods = mods.reshape(-1, 1, 6, width)
    g1, g2, s1, s2, b1, b2 = (mods[:, :, i] for i in range(6))
    h = SelfAttention(c, name='attn')(layer_norm(x, c.norm_eps) * (1 + s1) + b1, mask_kind, begin_ends,
                                      cache, cache_index)
    if cache is not None:
      h, cache = h
    x = constrain(x + self._drop_path(h * g1, drop_rate, train), _ACT)
    h = FFN(c, name='ffn')(layer_norm(x, c.norm_eps) * (1 + s2) + b2)
    x = constrain(x + self._drop_path(h * g2, drop_rate, train), _ACT)
    return x, cache

  def _drop_path(self, h, rate, train):
    if not train or self.config.drop_path_rate <= 0:
      return h
    keep = 1.0 - rate
    m = jax.random.bernoulli(self.make_rng('dropout'), keep, (h.shape[0],) + (1,) * (h.ndim - 1))
    return jnp.where(m, h / keep, 0.0)


def _block_class(c: VARConfig):
  """The block, rematerialised as config.remat says (its static arguments marked for jax.checkpoint)."""
  if c.remat == 'none':
    return AdaLNSelfAttn
  # Under scan, CSE across iterations cannot undo the remat, so prevent_cse may be off (faster).
  return nn.remat(AdaLNSelfAttn, policy=_REMAT_POLICIES[c.remat], prevent_cse=not c.scan_blocks,
                  static_argnums=(5, 6, 7, 8))


def drop_path_rates(c: VARConfig) -> np.ndarray:
  """VAR's stochastic depth: rates rising linearly from 0 at the first block to drop_path_rate."""
  return np.linspace(0, c.drop_path_rate, c.depth)


def empty_caches(c: VARConfig, batch: int):
  """Zero KV caches for causal inference over all L positions: per block a (k, v) pair of
  (batch, L, H, D), or with scanned blocks one pair stacked over the depth."""
  shape = (batch, c.seq_len, c.num_heads, c.head_dim)
  dt = jnp.dtype(c.dtype)
  if c.scan_blocks:
    return (jnp.zeros((c.depth,) + shape, dt), jnp.zeros((c.depth,) + shape, dt))
  return [(jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(c.depth)]


def stack_blocks(params, depth: int):
  """Per-block parameters (`blocks_0` ... `blocks_{depth-1}`, VAR's layout) -> one `blocks` subtree
  with a leading depth axis (the layout of scan_blocks). Applies at every level of the tree, so an
  optimiser state or a train state converts the same way; a tree without per-block keys is returned
  unchanged."""
  if not isinstance(params, dict):
    return params
  names = [f'blocks_{i}' for i in range(depth)]
  out = {k: stack_blocks(v, depth) for k, v in params.items() if k not in names}
  if all(n in params for n in names):
    if 'blocks' in params:
      raise ValueError('parameters hold both blocks_<i> and a stacked blocks subtree')
    out['blocks'] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[params[n] for n in names])
  elif any(n in params for n in names):
    raise ValueError(f'parameters hold {sorted(k for k in params if k in names)} but not all '
                     f'{depth} blocks')
  return out


def unstack_blocks(params, depth: int):
  """The inverse of `stack_blocks`: a stacked `blocks` subtree -> `blocks_0` ... `blocks_{depth-1}`."""
  if not isinstance(params, dict):
    return params
  out = {k: unstack_blocks(v, depth) for k, v in params.items() if k != 'blocks'}
  if 'blocks' in params:
    stacked = params['blocks']
    lead = {x.shape[0] for x in jax.tree_util.tree_leaves(stacked)}
    if lead != {depth}:
      raise ValueError(f'stacked blocks have leading sizes {sorted(lead)}, not the depth {depth}')
    for i in range(depth):
      out[f'blocks_{i}'] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
  return out


def blocks_layout(params, c: VARConfig):
  """`params` (either layout) in the layout of config `c`: stacked when c.scan_blocks, else per block."""
  return stack_blocks(params, c.depth) if c.scan_blocks else unstack_blocks(params, c.depth)


class AdaLNBeforeHead(nn.Module):
  config: VARConfig

  @nn.compact
  def __call__(self, x, cond):
    c = self.config
    mods = Dense(2 * c.width, ('embed', 'adaln'), trunc_normal(c.std, c.init_adaln), **_cpu(c),
                 name='ada_lin_1')(
        nn.silu(cond)).reshape(-1, 1, 2, c.width)
    return layer_norm(x, c.norm_eps) * (1 + mods[:, :, 0]) + mods[:, :, 1]


def _refine_modules(c: VARConfig):
  """The refine stream: a table of the vocabulary's embeddings plus [MASK] (row vocab_size), and a
  projection into the input stream whose kernel and bias start at zero (a checkpoint trained without
  the stream loads unchanged)."""
  embed = Embed(c.vocab_size + 1, c.width, ('vocab', 'embed'), c.std)
  proj = Dense(c.width, (None, 'embed'), nn.initializers.zeros, **_cpu(c))
  return embed, proj


def refine_params(c: VARConfig, rng):
  """Initial values of the refine stream's parameters ({'refine_embed': ..., 'refine_proj': ...}), the
  same initialisers as VAR(c).init: for adding the stream to weights trained without it."""
  embed, proj = _refine_modules(c)
  ids = jnp.zeros((1, 1), jnp.int32)
  return {'refine_embed': nn.meta.unbox(embed.init(rng, ids)['params']),
          'refine_proj': nn.meta.unbox(proj.init(rng, jnp.zeros((1, 1, c.width), jnp.float32))['params'])}


class VAR(nn.Module):
  """Logits (B, L, V) of every scale's tokens from the class label and the teacher-forcing input."""
  config: VARConfig

  def setup(self):
    c = self.config
    width = c.width
    self.word_embed = Dense(width, (None, 'embed'), trunc_normal(c.std), **_cpu(c))
    self.class_emb = Embed(c.num_classes + 1, width, ('classes', 'embed'), c.std)
    self.pos_start = self.param('pos_start', nn.with_logical_partitioning(
        trunc_normal(c.std), (None, None, 'embed')), (1, c.first_l, width), jnp.float32)
    self.pos_1LC = self.param('pos_1LC', nn.with_logical_partitioning(
        trunc_normal(c.std), (None, None, 'embed')), (1, c.seq_len, width), jnp.float32)
    self.lvl_embed = Embed(c.num_scales, width, (None, 'embed'), c.std)
    if c.shared_aln:
      self.shared_ada_lin_1 = Dense(6 * width, ('embed', 'adaln'), trunc_normal(c.std), **_cpu(c))
    block = _block_class(c)
    if c.scan_blocks:
      # Parameters stacked on a leading 'layers' axis; every layer draws its own dropout.
      self.blocks = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                            in_axes=(nn.broadcast, 0, 0) + (nn.broadcast,) * 4, length=c.depth,
                            metadata_params={nn.PARTITION_NAME: 'layers'})(c)
    else:
      self.blocks = [block(c) for _ in range(c.depth)]
    self.head_nm = AdaLNBeforeHead(c)
    # The head's matmul in the compute dtype too (a float32 one costs several times a bfloat16 one on
    # accelerators); its logits in float32 for the softmax and the loss.
    self.head = Dense(c.vocab_size, ('embed', 'vocab'), trunc_normal(c.std, c.init_head),
                      dtype=jnp.dtype(c.dtype), out_dtype=jnp.float32, **_cpu(c))
    if c.refine:
      self.refine_embed, self.refine_proj = _refine_modules(c)

  # --- pieces, shared with the sampler ----------------------------------------------------------

  def condition(self, labels):
    """Class embedding: the AdaLN condition and the start token (labels == num_classes: null)."""
    return self.class_emb(labels)

  def block_condition(self, cond):
    if self.config.shared_aln:
      return self.shared_ada_lin_1(nn.silu(cond)).reshape(-1, 1, 6, self.config.width)
    return cond

  def embed_scale(self, cond, x_scale, si: int, reveal=None):
    """Input tokens of scale `si`: the start token for si = 0, else word_embed of its f_hat input;
    with `reveal` (B, pn_si^2: a token id, or vocab_size = [MASK]) plus the refine stream."""
    c = self.config
    b, e = c.begin_ends[si]
    if si == 0:
      x = cond[:, None, :] + self.pos_start
    else:
      x = self.word_embed(x_scale.astype(jnp.float32))
    x = x + self.lvl_embed(jnp.asarray(si)) + self.pos_1LC[:, b:e]
    if reveal is not None:
      # Added last: with the zero-initialised projection the term is exactly +0.0, so a model that never
      # trained the stream gives bitwise its logits without it.
      x = x + self.refine_proj(self.refine_embed(reveal))
    return x

  def _check_reveal(self, reveal):
    if reveal is not None and not self.config.refine:
      raise ValueError('revealed tokens were given to a transformer without the refine stream '
                       '(VARConfig.refine=False, config.model.refine)')

  def run_blocks(self, x, cond, train: bool, mask_kind: str, begin_ends=None, caches=None,
                 cache_index: int = 0):
    """The block stack; with `caches` (from `empty_caches`) returns (x, updated caches)."""
    c = self.config
    bc = self.block_condition(cond)
    x = constrain(x, _ACT)
    static = (train, mask_kind, begin_ends, cache_index)
    rates = drop_path_rates(c)
    if c.scan_blocks:
      x, caches = self.blocks(x, bc, jnp.asarray(rates, jnp.float32), caches, *static)
    else:
      new = []
      for i, blk in enumerate(self.blocks):
        x, cache = blk(x, bc, float(rates[i]), None if caches is None else caches[i], *static)
        new.append(cache)
      caches = None if caches is None else new
    return x if caches is None else (x, caches)

  def scale_logits(self, cond, x_scale, si: int, caches=None, reveal=None):
    """Inference for one scale: logits (B, pn_si^2, V) from its input alone (markov: no cache, the
    scale attends to itself) or with the KV cache of the coarser scales (causal); returns
    (logits, caches). The scale's keys and values are written at its own rows of the cache, so a second
    pass of the same scale (masked resampling, `reveal` (B, pn_si^2)) rewrites them: later scales see
    those of the last pass."""
    self._check_reveal(reveal)
    x = self.embed_scale(cond, x_scale, si, reveal)
    if caches is None:
      x = self.run_blocks(x, cond, False, 'markov', begin_ends=((0, x.shape[1]),))
    else:
      x, caches = self.run_blocks(x, cond, False, 'causal', caches=caches,
                                  cache_index=self.config.begin_ends[si][0])
    return self.logits(x, cond), caches

  def logits(self, x, cond):
    return constrain(self.head(self.head_nm(x.astype(jnp.float32), cond)), _ACT_VOCAB)

  # --- the training forward ---------------------------------------------------------------------

  def __call__(self, labels, x_in, train: bool = False, reveal_ids=None, num_scales: int | None = None):
    """labels (B,) int, x_in (B, L-1, Cvae) -> logits (B, L, V) float32. `reveal_ids` (B, L) int: the
    refine stream, per position the revealed token id or vocab_size ([MASK]); None: no stream. With
    `num_scales` (static) only the first that many scales are computed (B, l, V): finer scales never
    reach coarser ones under either mask, so these are the first l logits of the whole sequence, at a
    fraction of the cost (progressive training)."""
    c = self.config
    begin_ends = c.begin_ends if num_scales is None else c.begin_ends[:num_scales]
    self._check_reveal(reveal_ids)
    if c.refine and reveal_ids is None and self.is_initializing():
      # Parameters are created where first used: initialisation must reach the refine stream.
      reveal_ids = jnp.full((labels.shape[0], c.seq_len), c.vocab_size, jnp.int32)
    rev = lambda b, e: None if reveal_ids is None else reveal_ids[:, b:e]
    if train and c.cond_drop_rate > 0:
      drop = jax.random.uniform(self.make_rng('dropout'), labels.shape) < c.cond_drop_rate
      labels = jnp.where(drop, c.num_classes, labels)
    cond = self.condition(labels)
    x = jnp.concatenate(
        [self.embed_scale(cond, None, 0, rev(*begin_ends[0]))] +
        [self.embed_scale(cond, x_in[:, b - c.first_l:e - c.first_l], si, rev(b, e))
         for si, (b, e) in enumerate(begin_ends) if si > 0], axis=1)
    x = self.run_blocks(x, cond, train, c.mask, begin_ends=begin_ends)
    return self.logits(x, cond)
