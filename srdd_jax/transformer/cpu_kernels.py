"""Hand-written backward passes for XLA:CPU: the same values as autodiff, laid out so the CPU moves less.

On a CPU the train step of a small model spends as much time moving activations as multiplying them
(docs/PERFORMANCE.md, the demo's profile), and two patterns of autodiff's program are the largest movers:

- **Weight gradients** dW = x^T dy contract over the rows of both operands. XLA:CPU then copies dy into a
  transposed layout and runs its generic dot, at about half the rate of its YNN dots (the MLP's fc2:
  the (4160, 512) x (4160, 128) gradient). `matmul` instead transposes the narrower of x and dy itself
  and hands YNN a row-major product, so the copy is of the smaller array and the dot is the fast one.
- **Attention** from the fused q/k/v projection: autodiff slices q, k and v out of it, transposes each
  chunk of scales to heads-first for its dots, and in the backward pads every slice's cotangent back to
  full size and sums them. `self_attention` transposes q, k and v to heads-first once, slices chunks from
  there, and writes the backward's d(qkv) in one piece; the softmax backward uses rowsum(dO * O) (as
  FlashAttention does) rather than rowsum(dP * P), a sum over D instead of over the keys.

Both pick their path by the platform the program is lowered for (`jax.lax.platform_dependent`): CPU
programs get the hand-written backward, every other backend (and a TPU program compiled ahead of time on
a CPU host) autodiff's. `cpu_kernels=False` (VARConfig.cpu_kernels) takes autodiff's path everywhere;
tests/test_cpu_kernels.py checks the two against each other.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax import files
from srdd_jax.transformer import attention

_NORM_EPS = 1e-12  # F.normalize's eps, as the model's _l2_normalize.


# --- matmul ----------------------------------------------------------------------------------------

def _matmul(x, kernel, out_dtype):
  return jnp.einsum('...i,io->...o', x, kernel, preferred_element_type=out_dtype)


def _transposed(a):
  """a (N, M) -> a^T (M, N) as a row-major copy. The barrier keeps XLA from folding the transpose back
  into the consuming dot's dimension numbers (which sends the dot to its slow path after copying the
  other, wider operand); the detour through (N, 2, M/2) keeps it from running a bfloat16 dot of a plain
  2-D transpose in float32 (converting both operands)."""
  n, m = a.shape
  if m % 2:
    return jax.lax.optimization_barrier(a.T)
  return jax.lax.optimization_barrier(jnp.transpose(a.reshape(n, 2, m // 2), (1, 2, 0))).reshape(m, n)


def _weight_gradient(x, dy):
  """x^T dy over all leading axes, (I, O) in float32, as a row-major product: the narrower of x and dy
  (both in the compute dtype) is the one transposed."""
  x2 = x.reshape(-1, x.shape[-1])
  d2 = dy.reshape(-1, dy.shape[-1])
  if x2.shape[1] <= d2.shape[1]:
    return jnp.dot(_transposed(x2), d2, preferred_element_type=jnp.float32)
  return jax.lax.optimization_barrier(jnp.dot(_transposed(d2), x2, preferred_element_type=jnp.float32)).T


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul_cpu(x, kernel, out_dtype, compute_dtype):
  return _matmul(x.astype(compute_dtype), kernel.astype(compute_dtype), jnp.float32).astype(out_dtype)


def _matmul_cpu_fwd(x, kernel, out_dtype, compute_dtype):
  xc, kc = x.astype(compute_dtype), kernel.astype(compute_dtype)
  # Empty arrays carry the inputs' dtypes to the backward, whose cotangents must have them.
  dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), kernel.dtype))
  return _matmul(xc, kc, jnp.float32).astype(out_dtype), (xc, kc, dtypes)


def _matmul_cpu_bwd(out_dtype, compute_dtype, res, dy):
  del out_dtype
  xc, kc, (x_dtype, k_dtype) = res
  dy = dy.astype(compute_dtype)  # Like autodiff's transposed dots: in the inputs' dtype, float32 sums.
  dx = jnp.einsum('...o,io->...i', dy, kc, preferred_element_type=jnp.float32)
  return dx.astype(x_dtype.dtype), _weight_gradient(xc, dy).astype(k_dtype.dtype)


_matmul_cpu.defvjp(_matmul_cpu_fwd, _matmul_cpu_bwd)


@functools.cache
def native_bfloat16() -> bool:
  """Whether this host's CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo)."""
  try:
    lines = files.read_text('/proc/cpuinfo').splitlines()
  except OSError:  # Not Linux: no way to tell here, so the portable float32.
    return False
  flags = next((l.split(':', 1)[1].split() for l in lines if l.startswith('flags')), [])
  return 'avx512_bf16' in flags or 'amx_bf16' in flags


def cpu_matmul_dtype(name: str):
  """The dtype CPU matmuls of a float32 model multiply in: config value 'float32', 'bfloat16', or
  'auto' (bfloat16 where `native_bfloat16()`, else float32)."""
  if name == 'auto':
    name = 'bfloat16' if native_bfloat16() else 'float32'
  return jnp.dtype(name)


def matmul(x, kernel, out_dtype, cpu_kernels: bool = True, cpu_dtype=None):
  """x (..., I) @ kernel (I, O), accumulated in float32, returned in `out_dtype`. On a CPU: the weight
  gradient of `_weight_gradient`, and the products in `cpu_dtype` when given (bfloat16: x and the
  kernel rounded to it, float32 sums; see VARConfig.cpu_matmul) instead of the inputs' dtype."""
  if not cpu_kernels:
    return _matmul(x, kernel, out_dtype)
  compute = jnp.dtype(cpu_dtype or x.dtype)
  return jax.lax.platform_dependent(
      x, kernel, cpu=functools.partial(_matmul_cpu, out_dtype=out_dtype, compute_dtype=compute),
      default=functools.partial(_matmul, out_dtype=out_dtype))


# --- gelu ------------------------------------------------------------------------------------------

_GELU_K = float(np.sqrt(2.0 / np.pi))


@jax.custom_vjp
def _gelu_cpu(x):
  return jax.nn.gelu(x, approximate=True)


def _gelu_cpu_fwd(x):
  # Only the input is kept: the backward recomputes tanh (cheap next to a pass over the MLP's width),
  # so the forward is one pass that writes the output alone (in the next matmul's dtype, fused).
  return jax.nn.gelu(x, approximate=True), x


def _gelu_cpu_bwd(x, dy):
  # d/dx [x (1 + tanh(u)) / 2], u = k (x + 0.044715 x^3).
  t = jnp.tanh(_GELU_K * (x + 0.044715 * x * x * x))
  return (dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_K * (1.0 + 3 * 0.044715 * x * x)),)


_gelu_cpu.defvjp(_gelu_cpu_fwd, _gelu_cpu_bwd)


def gelu(x, cpu_kernels: bool = True):
  """GELU, tanh form (VAR's MLP). On a CPU its backward recomputes tanh from the input instead of
  autodiff's saved tanh and derivative terms: one pass fewer each way over (B, L, 4C)."""
  if not cpu_kernels:
    return jax.nn.gelu(x, approximate=True)
  return jax.lax.platform_dependent(x, cpu=_gelu_cpu, default=lambda x: jax.nn.gelu(x, approximate=True))


# --- attention -------------------------------------------------------------------------------------

def _heads_first(qkv, bias, heads):
  """(B, L, 3C) + bias -> q, k, v as (B, H, L, D) float32."""
  b, l, c3 = qkv.shape
  t = (qkv.astype(jnp.float32) + bias).reshape(b, l, 3, heads, c3 // (3 * heads))
  return [jnp.transpose(t[:, :, i], (0, 2, 1, 3)) for i in range(3)]


def _unit(x):
  """(x / max(|x|, eps), |x|) over the last axis."""
  n = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(n, _NORM_EPS), n


def _unit_backward(du, u, n):
  """The cotangent of x from that of u = x / max(|x|, eps)."""
  along = jnp.where(n > _NORM_EPS, jnp.sum(u * du, axis=-1, keepdims=True), 0.0)
  return (du - u * along) / jnp.maximum(n, _NORM_EPS)


def _concat(parts, axis):
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def _key_sum(parts, length):
  """Sum of per-chunk key cotangents [(kb, ke, (B, H, D, ke - kb))] over `length` keys (the last axis): a
  concatenation where the chunks' key ranges tile the sequence (markov), else padded sums (causal
  prefixes)."""
  ends = [0] + [ke for _, ke, _ in parts]
  if [kb for kb, _, _ in parts] == ends[:-1] and ends[-1] == length:
    return _concat([x for _, _, x in parts], 3)
  total = None
  for kb, ke, x in parts:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (kb, length - ke)))
    total = x if total is None else total + x
  return total


def _last_two_swapped(x):
  """(..., L, D) -> (..., D, L) as a row-major copy (the barrier keeps XLA from folding it back into the
  consuming dot, as in `_transposed`)."""
  return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


@functools.lru_cache(maxsize=None)
def _fused_attention(heads: int, patch_nums: tuple[int, ...], mask: str, scale: float, l2_norm: bool,
                     dtype: str, qkv_dtype: str, group_min: int):
  """The custom-vjp attention of one static configuration (qkv, bias, scale_mul) -> (B, L, C)."""
  dt = jnp.dtype(dtype)
  parts = attention.chunks(patch_nums, mask, group_min)

  def forward(qkv, bias, scale_mul):
    b, l, _ = qkv.shape
    q, k, v = _heads_first(qkv, bias, heads)
    if l2_norm:
      uq, nq = _unit(q)
      uk, nk = _unit(k)
      q = uq * scale_mul.reshape(1, heads, 1, 1)
      k = uk
    else:
      uq = nq = uk = nk = None
      q = q * scale
    q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
    outs, probs = [], []
    for qb, qe, kb, ke, m in parts:
      logits = jnp.einsum('bhqd,bhkd->bhqk', q[:, :, qb:qe], k[:, :, kb:ke], preferred_element_type=jnp.float32)
      if m is not None:
        logits = jnp.where(m, logits, -jnp.inf)
      p = jax.nn.softmax(logits, axis=-1)
      probs.append(p)
      outs.append(jnp.einsum('bhqk,bhkd->bhqd', p.astype(dt), v[:, :, kb:ke], preferred_element_type=jnp.float32))
    o = _concat(outs, 2)
    out = jnp.transpose(o, (0, 2, 1, 3)).reshape(b, l, -1)
    return out, (q, k, v, uq, nq, uk, nk, probs, o, scale_mul)

  @jax.custom_vjp
  def fused(qkv, bias, scale_mul):
    return forward(qkv, bias, scale_mul)[0]

  def backward(res, dout):
    q, k, v, uq, nq, uk, nk, probs, o, scale_mul = res
    b, l, c = dout.shape
    do = jnp.transpose(dout.astype(jnp.float32).reshape(b, l, heads, c // heads), (0, 2, 1, 3))
    do_dt = do.astype(dt)
    # dK and dV contract over the queries, the first axis of both operands: as written ('bhqk,bhqd->bhkd')
    # XLA:CPU runs that in its generic dot (7% of the demo's step); with the narrow (L, D) operand
    # transposed once, (D, Lq) @ (Lq, Lk) is a row-major product, and dK^T, dV^T come out (B, H, D, L).
    q_t, do_t = _last_two_swapped(q), _last_two_swapped(do_dt)
    dqs, dks, dvs = [], [], []
    for (qb, qe, kb, ke, _), p in zip(parts, probs):
      do_c = do_dt[:, :, qb:qe]
      rows = jnp.sum(do[:, :, qb:qe] * o[:, :, qb:qe], axis=-1, keepdims=True)  # = rowsum(dP * P).
      dp = jnp.einsum('bhqd,bhkd->bhqk', do_c, v[:, :, kb:ke], preferred_element_type=jnp.float32)
      ds = (p * (dp - rows)).astype(dt)  # Masked keys have p = 0, so ds = 0 there.
      dqs.append(jnp.einsum('bhqk,bhkd->bhqd', ds, k[:, :, kb:ke], preferred_element_type=jnp.float32))
      dks.append((kb, ke, jnp.einsum('bhdq,bhqk->bhdk', q_t[..., qb:qe], ds, preferred_element_type=jnp.float32)))
      dvs.append((kb, ke, jnp.einsum('bhdq,bhqk->bhdk', do_t[..., qb:qe], p.astype(dt),
                                     preferred_element_type=jnp.float32)))
    dq = _concat(dqs, 2)
    dk, dv = (jnp.swapaxes(_key_sum(x, l), 2, 3) for x in (dks, dvs))
    if l2_norm:
      dscale = jnp.sum(dq * uq, axis=(0, 2, 3))
      dq = _unit_backward(dq * scale_mul.reshape(1, heads, 1, 1), uq, nq)
      dk = _unit_backward(dk, uk, nk)
    else:
      dscale = jnp.zeros_like(scale_mul)
      dq = dq * scale
    back = [jnp.transpose(x, (0, 2, 1, 3)) for x in (dq, dk, dv)]  # (B, L, H, D) each.
    dqkv = jnp.stack(back, axis=2).reshape(b, l, 3 * c)
    dbias = jnp.concatenate([jnp.sum(x, axis=(0, 1)).reshape(c) for x in back])
    return dqkv.astype(qkv_dtype), dbias, dscale.astype(scale_mul.dtype)

  def fused_fwd(qkv, bias, scale_mul):
    return forward(qkv, bias, scale_mul)

  fused.defvjp(fused_fwd, backward)
  return fused


def self_attention(qkv, bias, scale_mul, reference, *, heads: int, patch_nums, mask: str, scale: float,
                   l2_norm: bool, dtype, cpu_kernels: bool = True, group_min: int = attention.GROUP_MIN):
  """Training self-attention of the whole sequence from the q/k/v projection (B, L, 3C) (bias (3C,)
  not yet added): queries scaled by `scale_mul` (H,) after l2 normalisation (`l2_norm`, VAR's
  attn_l2_norm) or by `scale`, masked by `mask` over `patch_nums`, matmuls in `dtype`; (B, L, C) float32.
  `reference(qkv, bias, scale_mul)` is the autodiff path, taken off the CPU."""
  if not cpu_kernels:
    return reference(qkv, bias, scale_mul)
  fused = _fused_attention(int(heads), tuple(int(p) for p in patch_nums), mask, float(scale), bool(l2_norm),
                           jnp.dtype(dtype).name, jnp.dtype(qkv.dtype).name, int(group_min))
  return jax.lax.platform_dependent(qkv, bias, scale_mul, cpu=fused, default=reference)
