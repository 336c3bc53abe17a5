"""Attention under the two masks of the scale-wise transformer, without a dense L x L on the hot path.

`causal` (VAR): a query of scale i sees the keys of scales <= i (bidirectional inside a scale).
`markov` (SRDD): a query of scale i sees only its own scale.

Both masks are block-structured by scale, so the training forward (`sequence_attention`) splits the
queries into chunks of whole scales: a chunk's queries attend to a key range (causal: the prefix up
to the chunk's end; markov: the chunk itself) and only a chunk that holds several scales needs a small
in-chunk mask. Consecutive small scales share a chunk (at least `group_min` tokens) because one op per
1- or 4-token scale costs more in dispatch than it saves in FLOPs. The largest array is then a
(chunk, key range) block, never (L, L). `attend` is the unmasked case of inference (one scale alone,
or a scale's queries over a KV-cache prefix).

Implementations (`impl`, config.model.attention):
  xla     einsums, logits and softmax in float32; runs everywhere.
  cudnn   `jax.nn.dot_product_attention(implementation='cudnn')` for the unmasked chunks (the large
          scales, each alone); the small masked chunk stays on xla (cuDNN needs even lengths once a
          mask is given, and it is a few hundred tokens). cuDNN takes only float16/bfloat16, so with
          a float32 compute dtype this falls back to xla.
  splash  Pallas splash attention (TPU): a static block mask of the padded sequence, so fully masked
          (bq, bkv) blocks are skipped; `interpret=True` runs the kernel on CPU (tests).
  auto    resolved once by `resolve_impl` from the platform: cudnn on a GPU with a 16-bit compute
          dtype, splash on a TPU, else xla. The platform is `jax.default_backend()`, which is the
          host's when compiling ahead of time for another device (a TPU topology from a CPU host):
          set config.model.attention explicitly there.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax.parallel import mesh as pm

IMPLS = ('auto', 'xla', 'cudnn', 'splash')
MASKS = ('causal', 'markov')
# Smallest chunk of consecutive scales; measured on CPU (docs/attention_notes.md).
GROUP_MIN = 64
_SPLASH_LANES = 128  # splash needs kv blocks in multiples of 128, so sequences are padded to it.


def scale_ids(patch_nums: Sequence[int]) -> np.ndarray:
  """(L,) scale index of every position; the start token belongs to scale 0."""
  return np.concatenate([np.full(p * p, i, np.int32) for i, p in enumerate(patch_nums)])


def causal_mask(patch_nums: Sequence[int]) -> np.ndarray:
  """(L, L) bool, True where query scale >= key scale; for tests and reference only."""
  s = scale_ids(patch_nums)
  return s[:, None] >= s[None, :]


def markov_mask(patch_nums: Sequence[int]) -> np.ndarray:
  """(L, L) bool block-diagonal mask; for tests and reference only, never on the hot path."""
  s = scale_ids(patch_nums)
  return s[:, None] == s[None, :]


def dot_product_attention(q, k, v, scale: float, mask=None, dtype=jnp.float32):
  """q, k, v: (B, L, H, D). Logits and softmax in float32; the matmuls in `dtype`.

  `mask` is None or a bool (Lq, Lk) array; masked logits get -inf like VAR's additive bias.
  """
  logits = jnp.einsum('bqhd,bkhd->bhqk', (q * scale).astype(dtype), k.astype(dtype),
                      preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  w = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', w.astype(dtype), v.astype(dtype),
                    preferred_element_type=jnp.float32)


def markov_attention(q, k, v, scale: float, begin_ends: Sequence[tuple[int, int]], dtype=jnp.float32):
  """Block-diagonal attention: one dense attention per scale, concatenated along the sequence."""
  outs = [dot_product_attention(q[:, b:e], k[:, b:e], v[:, b:e], scale, None, dtype)
          for b, e in begin_ends]
  return jnp.concatenate(outs, axis=1)


def resolve_impl(impl: str, dtype, platform: str | None = None) -> str:
  """The implementation `impl` stands for on `platform` (default: jax.default_backend())."""
  if impl not in IMPLS:
    raise ValueError(f'attention implementation {impl!r} is not one of {IMPLS}')
  platform = platform or jax.default_backend()
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if impl == 'auto':
    return 'cudnn' if platform == 'gpu' and half else 'splash' if platform == 'tpu' else 'xla'
  if impl == 'cudnn' and not half:
    return 'xla'  # cuDNN's fused attention has no float32 kernel.
  return impl


@functools.lru_cache(maxsize=None)
def chunks(patch_nums: tuple[int, ...], mask: str, group_min: int = GROUP_MIN, block: int = 0):
  """The query chunks of `sequence_attention`: a tuple of (qb, qe, kb, ke, in-chunk mask or None).

  Chunks are runs of whole scales of at least `group_min` tokens (0: one scale each); `block` > 0
  instead cuts fixed blocks of that many queries (kept to compare against, see the notes), each over
  the keys its scales need. The mask, (qe - qb, ke - kb) bool, is None where nothing is masked.
  """
  if mask not in MASKS:
    raise ValueError(f'mask {mask!r} is not one of {MASKS}')
  sid = scale_ids(patch_nums)
  ends = np.cumsum([p * p for p in patch_nums])
  begins = ends - np.asarray([p * p for p in patch_nums])
  if block > 0:
    bounds = [(b, min(b + block, len(sid))) for b in range(0, len(sid), block)]
  else:
    bounds, start = [], 0
    for e in ends:
      if e - start >= group_min:
        bounds.append((start, int(e)))
        start = int(e)
    if start < len(sid):
      bounds.append((start, len(sid)))
  out = []
  for qb, qe in bounds:
    ke = int(ends[sid[qe - 1]])
    kb = 0 if mask == 'causal' else int(begins[sid[qb]])
    sq, sk = sid[qb:qe, None], sid[None, kb:ke]
    m = sq >= sk if mask == 'causal' else sq == sk
    out.append((qb, qe, kb, ke, None if m.all() else m))
  return tuple(out)


def sequence_attention(q, k, v, *, scale: float, patch_nums: Sequence[int], mask: str,
                       dtype=jnp.float32, impl: str = 'xla', platform: str | None = None,
                       group_min: int = GROUP_MIN, interpret: bool = False):
  """Training attention of the whole sequence under `mask` ('causal' | 'markov').

  q, k, v: (B, L, H, D) with L = sum pn^2; returns (B, L, H, D) float32. `impl` as in the module doc
  (`platform` overrides the backend 'auto' looks at); `interpret` runs splash in Pallas interpret
  mode.
  """
  patch_nums = tuple(int(p) for p in patch_nums)
  impl = resolve_impl(impl, dtype, platform)
  if impl == 'splash':
    return _splash(q, k, v, scale, (mask, patch_nums), dtype, interpret)
  outs = []
  for qb, qe, kb, ke, m in chunks(patch_nums, mask, group_min):
    qc, kc, vc = q[:, qb:qe], k[:, kb:ke], v[:, kb:ke]
    if impl == 'cudnn' and m is None:
      outs.append(_cudnn(qc, kc, vc, scale, dtype))
    else:
      outs.append(dot_product_attention(qc, kc, vc, scale, m, dtype))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def attend(q, k, v, *, scale: float, dtype=jnp.float32, impl: str = 'xla', platform: str | None = None,
           interpret: bool = False):
  """Unmasked attention of q (B, Lq, H, D) over k, v (B, Lk, H, D): inference's one scale alone, or
  a scale's queries over the KV-cache prefix. Returns (B, Lq, H, D) float32."""
  impl = resolve_impl(impl, dtype, platform)
  if impl == 'cudnn':
    return _cudnn(q, k, v, scale, dtype)
  if impl == 'splash':
    return _splash(q, k, v, scale, ('full', (q.shape[1], k.shape[1])), dtype, interpret)
  return dot_product_attention(q, k, v, scale, None, dtype)


def _cudnn(q, k, v, scale, dtype):
  # Layout (B, T, N, H) is the project's (B, L, H, D); the output comes back in `dtype`. cuDNN's
  # backward refuses odd lengths (jax 0.11 on an H200: "Unsupported sequence length Q 64, KV 155"),
  # and most scales and prefixes are odd: an odd side gets one zero row, a padded key is excluded by
  # the key lengths, and the padded query's output is sliced off (so it gets no gradient).
  b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
  pad = lambda x, n: jnp.pad(x.astype(dtype), ((0, 0), (0, n % 2), (0, 0), (0, 0)))
  lengths = {'key_value_seq_lengths': jnp.full((b,), lk, jnp.int32)} if lk % 2 else {}
  o = jax.nn.dot_product_attention(pad(q, lq), pad(k, lk), pad(v, lk), scale=scale, implementation='cudnn',
                                   **lengths)
  return o[:, :lq].astype(jnp.float32)


def _pad_to(n: int, m: int) -> int:
  return -(-n // m) * m


def _splash_module():
  # Imported on first use: the TPU kernels are not needed by the other paths.
  from jax.experimental.pallas.ops.tpu import splash_attention  # pylint: disable=import-outside-toplevel
  return splash_attention


@functools.lru_cache(maxsize=None)
def _splash_mask(kind: str, arg: tuple[int, ...], heads: int):
  """The padded splash mask and block sizes of kind 'causal' | 'markov' of patch_nums `arg`, or
  'full' of `arg` = (lq, lk). Numpy only, so cached across traces (the kernel holds device arrays and
  is made per trace; splash caches its own mask processing by this mask)."""
  sa = _splash_module()
  if kind == 'full':
    allowed = np.ones(arg, bool)
  else:
    allowed = causal_mask(arg) if kind == 'causal' else markov_mask(arg)
  lq, lk = allowed.shape
  pq, pk = _pad_to(lq, _SPLASH_LANES), _pad_to(lk, _SPLASH_LANES)
  # Real queries never see padded keys; padded queries see every key, so no softmax row is empty
  # (their outputs are sliced off).
  padded = np.zeros((pq, pk), bool)
  padded[:lq, :lk] = allowed
  padded[lq:] = True
  bq = next(b for b in (512, 256, 128) if pq % b == 0)
  bk = next(b for b in (512, 256, 128) if pk % b == 0)
  sizes = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                        block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  return sa.MultiHeadMask([sa.NumpyMask(padded)] * heads), sizes


def _splash(q, k, v, scale, key, dtype, interpret):
  # The kernel takes no softmax scale, so q is scaled before the cast (as dot_product_attention
  # does); it multiplies in the input dtype and accumulates and normalises in float32.
  lq, lk = q.shape[1], k.shape[1]
  pq, pk = _pad_to(lq, _SPLASH_LANES), _pad_to(lk, _SPLASH_LANES)

  def heads_first(x, n, p):
    return jnp.pad(jnp.swapaxes(x, 1, 2).astype(dtype), ((0, 0), (0, 0), (0, p - n), (0, 0)))

  def local(q, k, v):  # On one device's rows and heads.
    mask, sizes = _splash_mask(*key, q.shape[2])
    kernel = _splash_module().make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                              interpret=interpret)
    o = jax.vmap(kernel)(heads_first(q * scale, lq, pq), heads_first(k, lk, pk), heads_first(v, lk, pk))
    return jnp.swapaxes(o[:, :, :lq], 1, 2).astype(jnp.float32)

  ctx = pm.activation_context()
  if ctx is None:
    return local(q, k, v)
  # A Mosaic kernel is not partitioned by XLA: run it per device on the activations' shards (batch
  # over data x fsdp, heads over tensor), which is how they are laid out anyway.
  mesh, rules = ctx
  names = ('activation_batch', None, 'activation_heads', None)
  spec = lambda x: pm.logical_spec(mesh, rules, names, x.shape)
  spec_q, spec_k = spec(q), spec(k)
  unconstrained = jax.sharding.PartitionSpec.UNCONSTRAINED
  fix = lambda p: jax.sharding.PartitionSpec(*(None if a is unconstrained else a for a in p))
  return pm.shard_map(local, mesh, (fix(spec_q), fix(spec_k), fix(spec_k)), fix(spec_q))(q, k, v)