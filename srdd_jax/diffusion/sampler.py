"""The scale-wise sampler: the reverse process of the discrete-diffusion reading (SPEC §3-§4).

At scale k the transformer predicts the tokens of scale k from f_hat after scales < k:
- `markov`: one forward pass over the pn_k^2 tokens of the scale alone; no KV cache exists.
- `causal`: VAR's inference, the scale attending to a KV cache of all coarser scales, preallocated for
  L tokens (static shapes).
Guidance doubles the batch (conditional | null class, both fed the same f_hat). Its per-scale strengths
are constants of the program (from the SamplerConfig) or, with `guidance=`, an (S,) array argument: one
compiled program then serves every schedule and strength (a guidance sweep compiles once). Masked resampling
`refine` (SPEC §5) adds forward passes of the same scale with the accepted tokens revealed
(`Sampler.forward_passes` counts them). Every function is a
pure, jittable function of (params, labels, rng); the loop over scales is unrolled, one program.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from srdd_jax.diffusion import filtering
from srdd_jax.diffusion.filtering import SamplerConfig
from srdd_jax.parallel import mesh as pm
from srdd_jax.tokenizer.api import Tokenizer, is_concrete
from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.transformer.config import MASKS, VARConfig
from srdd_jax.transformer.model import VAR, empty_caches

BATCH_AXES = ('data', 'fsdp')


def batch_rng(seed: int, batch_index: int) -> jax.Array:
  """The key of one batch: the base seed with the batch index folded in (a reused key biases FID)."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), batch_index)


class Sampler:
  """Tokens and images from class labels; `mask` defaults to the transformer config's."""

  def __init__(self, var_config: VARConfig, vae_config: VQVAEConfig, sampler_config: SamplerConfig,
               mask: str | None = None, mesh=None, decode_precision: str | None = None):
    mask = mask or var_config.mask
    if mask not in MASKS:
      raise ValueError(f'mask={mask!r}: must be one of {MASKS}')
    if tuple(var_config.patch_nums) != tuple(vae_config.patch_nums):
      raise ValueError(f'the transformer patch_nums {var_config.patch_nums} differ from the tokenizer '
                       f'patch_nums {vae_config.patch_nums}')
    if (var_config.vocab_size, var_config.z_channels) != (vae_config.vocab_size, vae_config.z_channels):
      raise ValueError(f'transformer vocabulary/Cvae ({var_config.vocab_size}, {var_config.z_channels}) '
                       f'differ from the tokenizer ({vae_config.vocab_size}, {vae_config.z_channels})')
    self.var_config = var_config
    self.vae_config = vae_config
    self.config = sampler_config
    self.mask = mask
    self.mesh = mesh
    self.model = VAR(var_config)
    self.tokenizer = Tokenizer(vae_config)
    # The decoder may run at another matmul precision than the tokenizer's f_hat path: images are scored,
    # not compared bit for bit, so sampling decodes at the accelerator's default (config.sampler.
    # decode_precision) while reference checks keep None, the tokenizer's own (float32-exact).
    self.decoder = (self.tokenizer if decode_precision in (None, vae_config.precision)
                    else Tokenizer(dataclasses.replace(vae_config, precision=decode_precision)))
    self.guidance = sampler_config.guidance(var_config.num_scales)
    if sampler_config.mr_mode == 'refine' and not var_config.refine:
      raise ValueError("mr_mode='refine' (config.sampler.mr_mode) needs a transformer with the refine "
                       "stream (config.model.refine=True, trained with it); use mr_mode='redraw' here")

  def forward_passes(self) -> int:
    """Transformer passes over one scale each, per image: one per scale, plus one per iteration of
    masked resampling `refine` on each scale where it is on (`redraw` costs none)."""
    c, sc = self.var_config, self.config
    s = c.num_scales
    if sc.mr_mode != 'refine':
      return s
    return s + sum(sc.mr_iterations for si in range(s) if sc.mr_on(si, s))

  def check_labels(self, labels) -> None:
    """Out-of-range class ids are an error when the labels are concrete (the null class is allowed)."""
    if not is_concrete(labels):
      return
    a = np.asarray(labels)
    if a.ndim != 1:
      raise ValueError(f'labels must have shape (B,), got {a.shape}')
    if a.size and (a.min() < 0 or a.max() > self.var_config.num_classes):
      bad = int(a.min() if a.min() < 0 else a.max())
      raise ValueError(f'class id {bad} is out of range: the model has {self.var_config.num_classes} '
                       f'classes (0..{self.var_config.num_classes - 1}, {self.var_config.num_classes} = '
                       'unconditional)')

  def _constrain(self, x):
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec(BATCH_AXES)))

  def guidance_array(self, sampler_config: SamplerConfig | None = None) -> jax.Array:
    """The (S,) guidance strengths of `sampler_config` (default: this sampler's), as the `guidance=`
    argument of `tokens` / `sample`."""
    sc = sampler_config or self.config
    return jnp.asarray(sc.guidance(self.var_config.num_scales), jnp.float32)

  def tokens(self, var_params, vae_params, labels, rng, keep_ids: Sequence | None = None,
             keep_masks: Sequence | None = None, guidance=None):
    """-> (token ids per scale [(B, pn^2)], f_hat (B, h, w, Cvae)).

    With `keep_ids`/`keep_masks` (per scale, (B, pn^2)), tokens where the mask is True are replaced by
    the given ones before f_hat is updated: the zero-shot editing of SPEC §7.
    `guidance`: (S,) strengths replacing the config's schedule, possibly traced. The program then always
    runs the null-class half (strength 0 gives the conditional logits exactly, at guided cost).
    """
    self.check_labels(labels)
    if guidance is not None and jnp.shape(guidance) != (self.var_config.num_scales,):
      raise ValueError(f'guidance has shape {jnp.shape(guidance)}; it needs one strength per scale, '
                       f'({self.var_config.num_scales},)')
    if self.mesh is None:
      return self._tokens(var_params, vae_params, labels, rng, keep_ids, keep_masks, guidance)
    # Activations split over the batch axes, and kernels that XLA cannot partition (splash) run per
    # device on those shards.
    with pm.activation_sharding(self.mesh):
      return self._tokens(var_params, vae_params, labels, rng, keep_ids, keep_masks, guidance)

  def _tokens(self, var_params, vae_params, labels, rng, keep_ids, keep_masks, guidance):
    c, sc = self.var_config, self.config
    labels = self._constrain(jnp.asarray(labels, jnp.int32))
    b = labels.shape[0]
    if guidance is None:
      guided = any(t != 0 for t in self.guidance)
      guidance = self.guidance
    else:
      guided = True
    lab = jnp.concatenate([labels, jnp.full_like(labels, c.num_classes)]) if guided else labels
    cond = self.model.apply({'params': var_params}, lab, method=VAR.condition)
    caches = None
    if self.mask == 'causal':
      caches = empty_caches(c, lab.shape[0])
    f_hat = self.tokenizer.zero_fhat(b)
    x_scale = None
    ids = []
    for si in range(c.num_scales):
      x_in = None if si == 0 else (jnp.concatenate([x_scale, x_scale]) if guided else x_scale)
      n = c.patch_nums[si] ** 2
      # A refine model was trained with every token of the scale masked as its plain next-scale task.
      reveal = jnp.full((lab.shape[0], n), c.vocab_size, jnp.int32) if c.refine else None
      logits, caches = self._scale_logits(var_params, cond, x_in, si, caches, reveal)
      if guided:
        logits = filtering.guide(logits[:b], logits[b:], guidance[si])
      key = jax.random.fold_in(rng, si)
      mr = sc.mr_on(si, c.num_scales)
      tok = filtering.draw(key, logits, sc, mr and sc.mr_mode == 'redraw')
      keep = None
      if keep_masks is not None:
        keep = jnp.asarray(keep_masks[si], bool)
        tok = jnp.where(keep, jnp.asarray(keep_ids[si], jnp.int32), tok)
      if mr and sc.mr_mode == 'refine':
        tok, caches = self._refine(var_params, cond, x_in, si, caches, logits, tok, keep, key,
                                   guidance[si])
      tok = self._constrain(tok)
      ids.append(tok)
      f_hat, x_scale = self.tokenizer.next_input(vae_params, f_hat, tok, si)
    return ids, f_hat

  def _scale_logits(self, var_params, cond, x_in, si: int, caches, reveal):
    return self.model.apply({'params': var_params}, cond, x_in, si, caches, reveal, method=VAR.scale_logits)

  def _refine(self, var_params, cond, x_in, si: int, caches, logits, tok, keep, key, t):
    """Masked resampling `refine` at scale `si` (SPEC §5), from the tokens `tok` drawn from the guided
    `logits`: each iteration re-masks the tokens whose confidence is < mr_threshold, runs the scale once
    more with the others revealed (both halves of a guided batch alike) and draws the masked ones afresh;
    kept tokens (editing) are always revealed, never redrawn. A token's confidence is its probability
    under the pass that drew it, where it was masked: the refine stream is trained on hidden positions
    only, so a pass's outputs at revealed positions were never supervised and say nothing about the
    token there. Causal: the scale's cache rows are rewritten by every pass, so the next scale attends
    to the keys and values of the last pass. -> (tokens, caches)."""
    c, sc = self.var_config, self.config
    b = tok.shape[0]
    guided = cond.shape[0] != b

    def body(j, carry):
      tok, conf, caches = carry
      low = conf < sc.mr_threshold
      if keep is not None:
        low = low & ~keep
      reveal = jnp.where(low, c.vocab_size, tok)
      logits, caches = self._scale_logits(var_params, cond, x_in, si, caches,
                                          jnp.concatenate([reveal, reveal]) if guided else reveal)
      if guided:
        logits = filtering.guide(logits[:b], logits[b:], t)
      # The final distribution is filtered once for both the draw and the new tokens' confidences
      # (top-p sorts the vocabulary: the cost of an iteration on a CPU).
      vals, ids = filtering.candidates(logits, sc)
      new = filtering.draw_from(jax.random.fold_in(key, j + 1), vals, ids, sc, False)
      conf = jnp.where(low, filtering.probs_from(vals, ids, new), conf)
      return jnp.where(low, new, tok), conf, caches

    conf = filtering.probs_from(*filtering.candidates(logits, sc), tok)
    tok, _, caches = jax.lax.fori_loop(0, sc.mr_iterations, body, (tok, conf, caches))
    return tok, caches

  def decode(self, vae_params, f_hat):
    """f_hat -> images in [0, 1] (NHWC)."""
    return self.decoder.fhat_to_img(vae_params, f_hat) * 0.5 + 0.5

  def sample(self, var_params, vae_params, labels, rng, guidance=None):
    """-> (token ids per scale, images in [0, 1]); `guidance` as in `tokens`."""
    ids, f_hat = self.tokens(var_params, vae_params, labels, rng, guidance=guidance)
    return ids, self.decode(vae_params, f_hat)
