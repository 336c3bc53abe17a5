"""Per-scale token distributions: guidance schedules, temperature, top-k / top-p, masked resampling."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


MR_MODES = ('redraw', 'refine')


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """How tokens are drawn at each scale (SPEC §4-§5). Defaults: VAR's evaluation settings."""
  cfg: float = 1.5
  # 'linear' (VAR: t_k = cfg * k / (S-1)), 'constant' (t_k = cfg), or an explicit per-scale tuple.
  cfg_schedule: str | tuple[float, ...] = 'linear'
  temperature: float = 1.0
  top_k: int = 900  # 0 = off.
  top_p: float = 0.96  # 0 = off.
  # min-p truncation: drops tokens less likely than min_p x the most likely one (0 = off). Applied after
  # top-k and top-p; the study's plain-truncation arm against masked resampling's redraw.
  min_p: float = 0.0
  greedy: bool = False  # argmax of the guided logits (VAR's top_k=1).
  # How top-k finds its k: 'sort' (`lax.top_k`), 'bisect' (sort-free; faster on XLA:CPU), 'auto' (bisect
  # on the CPU, sort elsewhere). The same distribution; a seed's draws differ between the two.
  top_k_impl: str = 'auto'
  # Masked Resampling: tokens with probability < mr_threshold under the final distribution are drawn
  # again, mr_iterations times; mr_scales switches it per scale (None: all). mr_mode 'redraw' draws
  # them from the same logits; 'refine' re-masks them and runs the scale again with the other tokens
  # revealed (one forward pass per iteration; a model with VARConfig.refine).
  mr_threshold: float = 0.0
  mr_iterations: int = 0
  mr_scales: tuple[bool, ...] | None = None
  mr_mode: str = 'redraw'

  def __post_init__(self):
    if not isinstance(self.cfg_schedule, str):
      object.__setattr__(self, 'cfg_schedule', tuple(float(t) for t in self.cfg_schedule))
    if self.mr_scales is not None:
      object.__setattr__(self, 'mr_scales', tuple(bool(b) for b in self.mr_scales))
    if isinstance(self.cfg_schedule, str) and self.cfg_schedule not in ('linear', 'constant'):
      raise ValueError(f"SamplerConfig.cfg_schedule={self.cfg_schedule!r}: use 'linear', 'constant' or "
                       'a list of one guidance value per scale')
    if not (np.isfinite(self.cfg) and np.isfinite(self.temperature)):
      raise ValueError(f'SamplerConfig.cfg={self.cfg}, temperature={self.temperature}: must be finite')
    if isinstance(self.cfg_schedule, tuple) and not all(np.isfinite(t) for t in self.cfg_schedule):
      raise ValueError(f'SamplerConfig.cfg_schedule={self.cfg_schedule}: every value must be finite')
    if self.temperature <= 0:
      raise ValueError(f'SamplerConfig.temperature={self.temperature}: must be > 0')
    if self.top_k < 0:
      raise ValueError(f'SamplerConfig.top_k={self.top_k}: must be >= 0 (0 = off)')
    if self.top_k_impl not in ('auto', 'sort', 'bisect'):
      raise ValueError(f"SamplerConfig.top_k_impl={self.top_k_impl!r}: use 'auto', 'sort' or 'bisect'")
    if not 0 <= self.top_p <= 1:
      raise ValueError(f'SamplerConfig.top_p={self.top_p}: must be in [0, 1] (0 = off)')
    if not 0 <= self.min_p < 1:
      raise ValueError(f'SamplerConfig.min_p={self.min_p}: must be in [0, 1) (0 = off)')
    if self.mr_iterations < 0 or not 0 <= self.mr_threshold < 1:
      raise ValueError(f'SamplerConfig.mr_iterations={self.mr_iterations}, mr_threshold='
                       f'{self.mr_threshold}: need iterations >= 0 and a threshold in [0, 1)')

    if self.mr_mode not in MR_MODES:
      raise ValueError(f'SamplerConfig.mr_mode={self.mr_mode!r}: must be one of {MR_MODES}')

  def guidance(self, num_scales: int) -> tuple[float, ...]:
    """t_k of every scale."""
    if isinstance(self.cfg_schedule, tuple):
      if len(self.cfg_schedule) != num_scales:
        raise ValueError(f'SamplerConfig.cfg_schedule has {len(self.cfg_schedule)} values for '
                         f'{num_scales} scales')
      return self.cfg_schedule
    if self.cfg_schedule == 'constant':
      return (float(self.cfg),) * num_scales
    return tuple(self.cfg * k / max(num_scales - 1, 1) for k in range(num_scales))

  def mr_on(self, si: int, num_scales: int) -> bool:
    if self.mr_iterations <= 0 or self.mr_threshold <= 0 or self.greedy:
      return False
    if self.mr_scales is None:
      return True
    if len(self.mr_scales) != num_scales:
      raise ValueError(f'SamplerConfig.mr_scales has {len(self.mr_scales)} entries for {num_scales} scales')
    return self.mr_scales[si]


# Sampling protocols (SPEC §4-§5): the guidance and masked resampling a run samples with unless its
# config sets the value itself. A fair comparison samples each mask with its own method's protocol:
# VAR's evaluation settings for the causal baseline, SRDD's best settings for the markov model.
PROTOCOLS = {
    'var': dict(cfg=1.5, cfg_schedule='linear', mr_threshold=0.0, mr_iterations=0),
    'srdd': dict(cfg=5.0, cfg_schedule='linear', mr_threshold=0.01, mr_iterations=10),
}
PROTOCOL_OF_MASK = {'causal': 'var', 'markov': 'srdd'}


def guide(cond_logits, uncond_logits, t: float):
  """Classifier-free guidance (1 + t) * cond - t * uncond."""
  return (1.0 + t) * cond_logits - t * uncond_logits


def top_k_filter(logits, k: int):
  """Drops logits strictly below the k-th largest (ties with it stay), as VAR."""
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits, p: float):
  """Keeps the smallest set of most likely tokens with mass >= p; the top token is always kept.

  VAR's rule: sort ascending, drop the tokens whose cumulative probability is <= 1 - p."""
  if p <= 0 or p >= 1:
    return logits
  order = jnp.argsort(logits, axis=-1)
  srt = jnp.take_along_axis(logits, order, axis=-1)
  drop_sorted = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1) <= (1 - p)
  drop_sorted = drop_sorted.at[..., -1].set(False)
  # Back to vocabulary order by a scatter through the permutation: a second argsort (the inverse
  # permutation) costs as much as the first, the scatter a tenth of it (XLA:CPU, (100, 64, 512)).
  drop = jnp.put_along_axis(jnp.zeros_like(drop_sorted), order, drop_sorted, axis=-1, inplace=False)
  return jnp.where(drop, -jnp.inf, logits)


def min_p_filter(logits, p: float):
  """Drops the tokens whose probability is < p x the most likely token's (logit < max + log p)."""
  if p <= 0:
    return logits
  top = jnp.max(logits, axis=-1, keepdims=True)
  return jnp.where(logits < top + np.log(p), -jnp.inf, logits)


def final_logits(logits, sc: SamplerConfig):
  """Temperature, then top-k, then top-p, then min-p over the full vocabulary (reference semantics)."""
  logits = logits.astype(jnp.float32) / sc.temperature
  return min_p_filter(top_p_filter(top_k_filter(logits, sc.top_k), sc.top_p), sc.min_p)


def candidates(logits, sc: SamplerConfig, impl: str | None = None):
  """The final distribution in a compact form: (logits (..., K), token ids (..., K) or None).

  With top-k on, only the k best tokens can be drawn, so top-p, sampling and masked resampling work on
  those k (no sort of the whole vocabulary: far less memory at the 4096-token vocabulary). Exactly k are
  kept where VAR would keep every tie of the k-th value, a difference of measure zero for real-valued
  logits. `impl` (default `sc.top_k_impl`): 'sort' (`lax.top_k`, the k in descending order), 'bisect'
  (sort-free, the k in vocabulary order: XLA:CPU's TopK is its sampler's largest cost outside the
  model, and this form filters and draws 1.65x faster at VAR's last scale there, benchmarks/filter_sortfree.py;
  it keeps a few (rows, vocabulary) temporaries that the sort does not), 'auto' (bisect on the CPU,
  sort elsewhere). Both give the same distribution; a seed's draws differ between them, since a draw
  depends on the candidates' order.
  """
  logits = logits.astype(jnp.float32) / sc.temperature
  impl = impl or sc.top_k_impl
  if 0 < sc.top_k < logits.shape[-1]:
    if impl == 'auto':
      impl = 'bisect' if jax.default_backend() == 'cpu' else 'sort'
    rows = logits.size // logits.shape[-1]
    if impl == 'bisect' and (logits.shape[-1] >= 2 ** 15 or rows * sc.top_k >= 2 ** 31):
      impl = 'sort'  # Its packed counts or its flat int32 slots would overflow.
    if impl == 'bisect':
      vals, ids = _top_k_bisect(logits, sc.top_k)
      vals = _top_p_bisect(vals, sc.top_p)
    else:
      vals, ids = jax.lax.top_k(logits, sc.top_k)  # Descending.
      if 0 < sc.top_p < 1:
        asc = vals[..., ::-1]
        drop = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1) <= (1 - sc.top_p)
        drop = drop.at[..., -1].set(False)
        vals = jnp.where(drop[..., ::-1], -jnp.inf, vals)
    return min_p_filter(vals, sc.min_p), ids
  return min_p_filter(top_p_filter(logits, sc.top_p), sc.min_p), None


def _order_key(x):
  """int32 keys in the order of the float32 values (the bits of negative floats reversed)."""
  i = jax.lax.bitcast_convert_type(x, jnp.int32)
  return jnp.where(i < 0, i ^ jnp.int32(0x7fffffff), i)


def _largest_key(key, holds):
  """Per row, the largest int32 t with holds(key >= t) (true at int32's minimum, monotone), by 32
  bisection passes: exact, where a search over float values would stop at a tolerance."""
  lo = jnp.full(key.shape[:-1] + (1,), jnp.iinfo(jnp.int32).min, jnp.int32)
  hi = jnp.full(key.shape[:-1] + (1,), jnp.iinfo(jnp.int32).max, jnp.int32)

  for _ in range(32):  # Unrolled: a loop would carry (and copy) the (rows, vocabulary) keys in its state.
    mid = (lo >> 1) + (hi >> 1) + ((lo & 1) | (hi & 1))  # The upper midpoint, without int32 overflow.
    ok = holds(key >= mid)
    lo, hi = jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
  return lo


def _top_k_bisect(logits, k: int):
  """The k largest logits and their ids, in vocabulary order: the k-th value by bisection, every value
  above it, then as many of its ties as fit (the lowest ids), gathered into k slots by a prefix sum."""
  vocab = logits.shape[-1]
  key = _order_key(logits)
  kth = _largest_key(key, lambda m: jnp.sum(m.astype(jnp.int32), axis=-1, keepdims=True) >= k)
  above = key > kth
  ties = key == kth
  room = k - jnp.sum(above.astype(jnp.int32), axis=-1, keepdims=True)
  # One prefix sum for both counts (values above the k-th in the low 16 bits, its ties in the high ones;
  # the vocabulary is below 2^15): a second one would be another (rows, vocabulary) int32 array.
  counts = jnp.cumsum(above.astype(jnp.int32) + (ties.astype(jnp.int32) << 16), axis=-1)
  tie_rank = counts >> 16
  keep = above | (ties & (tie_rank <= room))
  slot = (counts & 0xffff) + jnp.minimum(tie_rank, room) - 1
  lead = logits.shape[:-1]
  rows = int(np.prod(lead))
  # Flat positions (row * k + slot; past the end where not kept) scatter in one dimension: a (row, slot)
  # index pair per element would double the indices' memory.
  flat = jnp.where(keep, jnp.arange(rows, dtype=jnp.int32).reshape(lead + (1,)) * k + slot, rows * k)
  ids = jnp.zeros((rows * k,), jnp.int32).at[flat.reshape(-1)].set(
      jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), flat.shape).reshape(-1), mode='drop')
  ids = ids.reshape(lead + (k,))
  return jnp.take_along_axis(logits, ids, axis=-1), ids


def _top_p_bisect(vals, p: float):
  """VAR's top-p without a sort: a token stays iff the tokens more likely than it hold mass < p, i.e.
  iff its logit is at least the largest t whose tokens at or above t hold mass >= p."""
  if p <= 0 or p >= 1:
    return vals
  probs = jax.nn.softmax(vals, axis=-1)
  key = _order_key(vals)
  cut = _largest_key(key, lambda m: jnp.sum(jnp.where(m, probs, 0.0), axis=-1, keepdims=True) >= p)
  return jnp.where(key >= cut, vals, -jnp.inf)


def draw(rng, logits, sc: SamplerConfig, mr: bool):
  """Tokens (B, l) from guided logits (B, l, V), with `redraw` Masked Resampling when `mr`."""
  if sc.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return draw_from(rng, *candidates(logits, sc), sc, mr)


def draw_from(rng, vals, ids, sc: SamplerConfig, mr: bool):
  """`draw` from the final distribution `candidates` gave (the filtering, whose sorts are the costly
  part, done once for a draw and the probabilities of the same logits)."""
  rng, sub = jax.random.split(rng)
  choice = jax.random.categorical(sub, vals, axis=-1).astype(jnp.int32)
  if mr:
    choice = masked_redraw(rng, vals, choice, sc.mr_threshold, sc.mr_iterations)
  if ids is None:
    return choice
  return jnp.take_along_axis(ids, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)


def token_probs(logits, tokens, sc: SamplerConfig):
  """Probability of each of `tokens` (B, l) under the final distribution of guided `logits` (B, l, V)
  (temperature, top-k, top-p): 0 for a token the filters removed."""
  return probs_from(*candidates(logits, sc), tokens)


def probs_from(vals, ids, tokens):
  """`token_probs` from the final distribution `candidates` gave."""
  probs = jax.nn.softmax(vals, axis=-1)
  if ids is None:
    return jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(ids == tokens[..., None], probs, 0.0), axis=-1)


def masked_redraw(rng, logits, tokens, threshold: float, iterations: int):
  """Redraws every token whose probability is < threshold, `iterations` times (fixed shapes).

  Each pass keeps the confident tokens and draws the others afresh from the same distribution, so
  after n passes a token is low-probability only if all n + 1 draws were: as n grows this converges to
  sampling from the distribution restricted to the tokens with p >= threshold.
  """
  logp = jax.nn.log_softmax(logits, axis=-1)
  log_thr = np.log(threshold)

  def body(i, tok):
    low = jnp.take_along_axis(logp, tok[..., None], axis=-1)[..., 0] < log_thr
    new = jax.random.categorical(jax.random.fold_in(rng, i), logits, axis=-1).astype(tok.dtype)
    return jnp.where(low, new, tok)

  return jax.lax.fori_loop(0, iterations, body, tokens)
