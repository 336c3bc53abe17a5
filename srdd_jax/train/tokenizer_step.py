"""Tokenizer training state, sharded initialisation, and the jitted train and eval steps.

One step: the VQ-VAE's training pass (VQ loss, straight-through f_hat, reconstruction), an optional
patch-GAN (hinge loss; the generator's term and the discriminator's updates start at gan_start_step),
AdamW updates, the per-scale code-usage EMA, and every K steps the restart of dead codes. The step's
randomness is fold_in(PRNGKey(seed), step), so a resumed run repeats an uninterrupted one bit for bit.
The skeleton is the transformer's (train/sharded.py): abstract state -> logical-rule shardings -> jitted init,
and a donated step with explicit in/out shardings.
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from srdd_jax.data import preprocess as pp
from srdd_jax.parallel import mesh as pm
from srdd_jax.tokenizer.api import Tokenizer
from srdd_jax.tokenizer.vqvae import VQVAE, VQVAEConfig
from srdd_jax.train import code_restart
from srdd_jax.train import tokenizer_losses as losses
from srdd_jax.train.discriminator import PatchDiscriminator
from srdd_jax.train.optimizer import build_optimizer, warmup_schedule
from srdd_jax.train.sharded import ShardedTrainer, global_norm
from srdd_jax.train.tokenizer_settings import TrainSettings

# Where the shared codebook sits in the parameter tree (and in each optimiser moment that mirrors it).
CODEBOOK_PATH = ('quantize', 'embedding', 'embedding')
# Salt of the restart's random draw, so it never reuses a key another use of the step key might take.
_RESTART_SALT = 1


@flax.struct.dataclass
class TokenizerTrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  usage_ema: jax.Array  # (S, V) EMA of per-scale code frequencies.
  disc_params: Any = None  # None when the GAN is off.
  disc_opt_state: Any = None


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(p, 'key', getattr(p, 'name', p))) for p in path)


def _decayed(path, leaf) -> bool:
  """Kernels are decayed; biases, norms (1-D) and the codebook (decay would drag codes to 0) are not."""
  return leaf.ndim > 1 and _path_names(path)[-len(CODEBOOK_PATH):] != CODEBOOK_PATH


def _zero_codebook_rows(opt_state, rows):
  """Zeroes the optimiser moments of the given codebook rows: a restarted code starts afresh instead of
  being pushed by momentum it gathered at its old place."""
  def fix(path, leaf):
    if _path_names(path)[-len(CODEBOOK_PATH):] == CODEBOOK_PATH and getattr(leaf, 'ndim', 0) == 2:
      return jnp.where(rows[:, None], jnp.zeros_like(leaf), leaf)
    return leaf
  return jax.tree_util.tree_map_with_path(fix, opt_state)


def _set_codebook(params, codebook):
  params = flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else params
  a, b, c = CODEBOOK_PATH
  return {**params, a: {**params[a], b: {**params[a][b], c: codebook}}}


@functools.cache
def fast_init_options() -> dict | None:
  """On XLA:CPU the initialiser compiles 3x faster unoptimised (its ~150 unrolled threefry draws are
  what takes the time; the values are integer arithmetic and come out the same); it runs once."""
  if jax.default_backend() != 'cpu':
    return None
  opts = {'xla_backend_optimization_level': 0}
  try:
    jax.jit(lambda x: x + 1, compiler_options=opts).lower(1.0).compile()
  except Exception:  # pylint: disable=broad-except
    return None
  return opts


@functools.lru_cache(maxsize=4)
def trainer_for(vq: VQVAEConfig, settings: TrainSettings, mesh, rules=pm.DEFAULT_RULES) -> TokenizerTrainer:
  """One trainer per (architecture, settings, mesh, rules) in a process, so that a run stopped and
  resumed in the same process (tests, notebooks) reuses the compiled step instead of compiling again."""
  return TokenizerTrainer(vq, settings, mesh, tuple(rules))


class TokenizerTrainer(ShardedTrainer):
  """Builds the sharded state, the train step and the held-out evaluation for one config and mesh."""

  def __init__(self, vq: VQVAEConfig, settings: TrainSettings, mesh, rules=pm.DEFAULT_RULES):
    super().__init__(mesh, rules, settings.seed)
    self.vq, self.s = vq, settings
    self.tokenizer = Tokenizer(vq)
    self.module = VQVAE(vq)
    self.disc = PatchDiscriminator(settings.discriminator) if settings.use_gan else None
    self.tx = self._optimizer(settings.lr, settings.weight_decay)
    self.disc_tx = self._optimizer(settings.disc_lr, 0.0) if self.disc is not None else None
    self.lr = self._schedule(settings.lr)

  def _schedule(self, peak: float):
    s = self.s
    return warmup_schedule(peak, s.warmup_steps, s.steps, s.lr_schedule, s.lr_final_fraction)

  def _optimizer(self, peak: float, weight_decay: float):
    s = self.s
    return build_optimizer(self._schedule(peak), b1=s.b1, b2=s.b2, eps=s.eps, clip_norm=s.clip_norm,
                           weight_decay=weight_decay, decay=_decayed)

  # --- state ------------------------------------------------------------------------------------

  def boxed_state(self, rng):
    k_vae, k_disc = jax.random.split(rng)
    params = self.tokenizer.init(k_vae)
    usage = jnp.zeros((self.vq.num_scales, self.vq.vocab_size), jnp.float32)
    disc_params = disc_opt = None
    if self.disc is not None:
      size = self.vq.image_size
      x = jnp.zeros((1, size, size, self.vq.in_channels), jnp.float32)
      disc_params = self.disc.init(k_disc, x)['params']
      disc_opt = self.disc_tx.init(disc_params)
    return TokenizerTrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=self.tx.init(params),
                               usage_ema=usage, disc_params=disc_params, disc_opt_state=disc_opt)

  def init_compiler_options(self):
    return fast_init_options()

  # --- losses -----------------------------------------------------------------------------------

  def gan_active(self, step):
    """1.0 from gan_start_step on (0.0 before, and always without a discriminator)."""
    if self.disc is None:
      return jnp.zeros([], jnp.float32)
    return (step >= self.s.gan_start_step).astype(jnp.float32)

  def generator_loss(self, params, disc_params, images, gan_on):
    """(total loss, (metrics, reconstruction, training-pass aux)) of the encoder/quantizer/decoder."""
    s = self.s
    recon, aux = self.module.apply({'params': params}, images, s.beta, method=VQVAE.train_forward)
    rec = losses.reconstruction_losses(images, recon)
    loss = s.l1_weight * rec['l1'] + s.l2_weight * rec['l2'] + s.vq_weight * aux['vq_loss']
    metrics = {'l1': rec['l1'], 'l2': rec['l2'], 'vq_loss': aux['vq_loss']}
    if self.disc is not None:
      g_adv = losses.hinge_g_loss(self.disc.apply({'params': disc_params}, recon))
      # Multiplied rather than branched: before the start the term and its gradient are exactly 0.
      gan_loss = s.gan_weight * gan_on * g_adv
      loss = loss + gan_loss
      metrics.update(g_adv=g_adv, gan_loss=gan_loss)
    metrics['loss'] = loss
    return loss, (metrics, recon, aux)

  def discriminator_loss(self, disc_params, images, fakes):
    """Hinge loss on real images and (gradient-stopped) reconstructions, in one batched pass (GroupNorm
    keeps the two halves independent)."""
    logits = self.disc.apply({'params': disc_params}, jnp.concatenate([images, fakes], axis=0))
    real, fake = jnp.split(logits, 2, axis=0)
    return losses.hinge_d_loss(real, fake), {'logits_real': jnp.mean(real), 'logits_fake': jnp.mean(fake)}

  # --- the step ---------------------------------------------------------------------------------

  def _step(self, state: TokenizerTrainState, batch):
    s, vq = self.s, self.vq
    rng = self.step_key(state.step)
    images = pp.to_model_range(batch['images'])  # uint8 from the input pipeline, normalised here.
    gan_on = self.gan_active(state.step)
    grad_fn = jax.value_and_grad(self.generator_loss, has_aux=True)
    (_, (metrics, recon, aux)), grads = grad_fn(state.params, state.disc_params, images, gan_on)
    metrics['grad_norm'] = global_norm(grads)
    metrics['lr'] = self.lr(state.step)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    disc_params, disc_opt = state.disc_params, state.disc_opt_state
    if self.disc is not None:
      fakes = jax.lax.stop_gradient(recon)

      def disc_update(operands):
        dp, dopt = operands
        (d_loss, d_m), d_grads = jax.value_and_grad(self.discriminator_loss, has_aux=True)(dp, images, fakes)
        d_upd, dopt = self.disc_tx.update(d_grads, dopt, dp)
        return optax.apply_updates(dp, d_upd), dopt, {'d_loss': d_loss, **d_m}

      def disc_wait(operands):
        zero = jnp.zeros([], jnp.float32)
        return operands[0], operands[1], {'d_loss': zero, 'logits_real': zero, 'logits_fake': zero}

      # A real branch, not a multiplication: before the start the discriminator and its Adam state
      # must not move at all (Adam would still normalise zero gradients into nothing but count steps).
      disc_params, disc_opt, d_metrics = jax.lax.cond(gan_on > 0, disc_update, disc_wait,
                                                      (disc_params, disc_opt))
      metrics.update(d_metrics)

    hits = aux['hits']
    usage = code_restart.update_usage_ema(state.usage_ema, hits, state.step, s.usage_ema_decay)
    new_step = state.step + 1
    restarted = jnp.zeros((vq.vocab_size,), bool)
    if s.dead_code_restart_every > 0:
      due = new_step % s.dead_code_restart_every == 0
      restarted = code_restart.dead_codes(usage, vq.patch_nums, s.dead_code_threshold) & due
      # Where the codes are needed: the vectors the scales quantize (pooled residuals, each scale by its
      # number of positions), which shrink scale after scale; raw encoder features (the old choice)
      # look like the first scale's only, so codes restarted there stay unused at the finer scales.
      source = aux['quantized'] if s.restart_from == 'residuals' else aux['f']
      features = jax.lax.stop_gradient(source).reshape(-1, vq.z_channels).astype(jnp.float32)
      key = jax.random.fold_in(rng, _RESTART_SALT)
      a, b, c = CODEBOOK_PATH
      codebook = code_restart.restart(params[a][b][c], restarted, features, key)
      params = _set_codebook(params, codebook)
      opt_state = _zero_codebook_rows(opt_state, restarted)
      usage = code_restart.reset_ema_of(usage, restarted)
    metrics['restarted_codes'] = jnp.sum(restarted.astype(jnp.int32))
    metrics['dead_codes'] = jnp.sum(
        code_restart.dead_codes(usage, vq.patch_nums, s.dead_code_threshold).astype(jnp.int32))
    metrics.update(losses.usage_statistics(hits))
    new_state = TokenizerTrainState(new_step, params, opt_state, usage, disc_params, disc_opt)
    return new_state, metrics

  @functools.cached_property
  def step_fn(self):
    """The jitted step (state, {'images': (B, H, W, 3)}) -> (state, metrics), the state donated."""
    return self.jit_step(self._step)

  # --- evaluation -------------------------------------------------------------------------------

  def _eval(self, params, images):
    """Inference path of the frozen tokenizer (tokens, then the clipped decoder): per-image 8-bit MSE,
    the reconstructions and the per-image code hits per scale (B, S, V)."""
    images = images.astype(jnp.float32)
    f = self.module.apply({'params': params}, images, method=VQVAE.encode)
    ids, fhats = self.module.apply({'params': params}, f, True, method=VQVAE.f_to_idx)
    recon = self.module.apply({'params': params}, fhats[-1], method=VQVAE.decode)
    v = self.vq.vocab_size
    hits = jnp.stack([jax.nn.one_hot(i, v, dtype=jnp.float32).sum(axis=1) for i in ids], axis=1)
    return losses.squared_error_per_image(images, recon), recon, hits

  @functools.cached_property
  def eval_fn(self):
    """The jitted evaluation (params, images) -> (per-image 8-bit MSE, reconstructions, per-image code
    hits (B, S, V))."""
    return jax.jit(self._eval, in_shardings=(self.state_shardings.params, self.batch_sharding),
                   out_shardings=(pm.replicated(self.mesh), self.batch_sharding, pm.replicated(self.mesh)))
