"""Transformer train state, sharded initialisation and the jitted, donated train step."""
from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax.config import ConfigError
from srdd_jax.data import preprocess as pp
from srdd_jax.parallel import mesh as pm
from srdd_jax.tokenizer.api import Tokenizer
from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.train import progressive as progressive_lib
from srdd_jax.train.optimizer import OptimConfig, lr_schedule, var_optimizer
from srdd_jax.train.progressive import Progressive
from srdd_jax.train.sharded import ShardedTrainer, global_norm
from srdd_jax.transformer.config import VARConfig
from srdd_jax.transformer.loss import cross_entropy_metrics
from srdd_jax.transformer.model import VAR

# The EMA's warm-up: at step t it averages with decay min(decay, (1 + t) / (EMA_WARMUP + t)). Without it
# an EMA of decay d still holds d^T of its starting point after T steps (0.999: 37% of a random
# initialisation, or of a fine-tune's start model, after 1,000 steps), and the EMA is what is exported.
EMA_WARMUP = 10


def ema_decay_at(decay: float, step):
  """The EMA's decay at `step` (the state's step before the update: 0 on the first), traced or not; a
  function of the step alone, so a resumed run averages exactly as an uninterrupted one."""
  t = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + t) / (EMA_WARMUP + t))


def ema_start_weight(decay: float, steps: int) -> float | None:
  """The weight the EMA's starting point (the random initialisation, or a fine-tune's start model) keeps
  after `steps` steps: the product of the decays of steps 0..steps-1. None without an EMA (decay 0: the
  export is the trained weights themselves)."""
  if decay <= 0:
    return None
  t = np.arange(int(steps), dtype=np.float64)
  return float(np.exp(np.sum(np.log(np.minimum(decay, (1.0 + t) / (EMA_WARMUP + t))))))


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None


def check_accum_steps(accum_steps) -> None:
  """Checked here only; the config check calls it before anything divides by it."""
  if int(accum_steps) < 1:
    raise ConfigError(f'config.train.accum_steps={accum_steps}: must be >= 1')


class Trainer(ShardedTrainer):
  """Builds the sharded state and the train step of the transformer for one configuration on one mesh.

  The step's randomness (label dropout, drop path) is `fold_in(PRNGKey(seed), step)`, so a resumed run
  draws exactly what an uninterrupted one would. Subclasses change the objective (`loss`) and the frozen
  weights the step reads (`frozen`).
  """

  def __init__(self, var_config: VARConfig, vae_config: VQVAEConfig, optim: OptimConfig, mesh,
               rules=pm.DEFAULT_RULES, accum_steps: int = 1, ema_decay: float = 0.0, seed: int = 0,
               progressive: Progressive | None = None):
    check_accum_steps(accum_steps)
    if progressive is not None and progressive.num_scales != var_config.num_scales:
      raise ValueError(f'progressive schedule for {progressive.num_scales} scales, model has '
                       f'{var_config.num_scales}')
    super().__init__(mesh, rules, seed)
    self.progressive = progressive
    self.var_config, self.vae_config, self.optim = var_config, vae_config, optim
    self.accum_steps, self.ema_decay = accum_steps, ema_decay
    self.model = VAR(var_config)
    self.tokenizer = Tokenizer(vae_config)
    self.tx = var_optimizer(optim)
    self.lr = lr_schedule(optim)

  # --- state ------------------------------------------------------------------------------------

  def boxed_state(self, rng):
    c = self.var_config
    x = jnp.zeros((1, c.seq_len - 1, c.z_channels), jnp.float32)
    params = self.model.init(rng, jnp.zeros((1,), jnp.int32), x)['params']
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=self.tx.init(params),
                      ema_params=params if self.ema_decay > 0 else None)

  # --- the step ---------------------------------------------------------------------------------

  def stage(self, step: int):
    """The static stage of the program that trains `step` (progressive.Progressive.stage), or None
    when every step trains all scales."""
    return None if self.progressive is None else self.progressive.stage(int(step))

  def frozen(self, vae_params):
    """The frozen weights the step reads, from the tokenizer's (a subclass may add its own)."""
    return vae_params

  def tokenizer_params(self, frozen):
    """The tokenizer's weights among the frozen ones."""
    return frozen

  def logits(self, params, frozen, labels, ids, rng, stage=None, **inputs):
    """Teacher forcing, the prelude of every objective: the inputs of `ids` (B, L) from the tokenizer,
    then the transformer's logits (B, l, V) in training mode (label dropout and drop path from `rng`; l
    cut after the newest scale of a progressive `stage`), activations split over the batch axes.
    `inputs` are the model's extra inputs (the refine stream's revealed tokens). -> (logits, x_in)."""
    c = self.var_config
    scales = [ids[:, b:e] for b, e in c.begin_ends]
    x_in = self.tokenizer.idx_to_var_input(self.tokenizer_params(frozen), scales)
    # Activations stay split over the batch axes (FSDP shards parameters, never activations).
    with pm.activation_sharding(self.mesh, self.rules):
      logits = self.model.apply({'params': params}, labels, x_in, train=True, rngs={'dropout': rng},
                                num_scales=None if stage is None else stage[0], **inputs)
    return logits, x_in

  def loss(self, params, frozen, labels, ids, rng, stage=None, newest=None):
    """(loss, metrics) of one (micro-)batch: next-scale cross-entropy, the newest scale of a progressive
    stage weighted by `newest`."""
    logits, _ = self.logits(params, frozen, labels, ids, rng, stage)
    return cross_entropy_metrics(logits, ids, self.var_config, newest)

  def tokens(self, frozen, batch):
    """The batch's token ids (B, L): given, or encoded on the fly by the frozen tokenizer (float32)."""
    if 'ids' in batch:
      return batch['ids']
    scales = self.tokenizer.img_to_idx(self.tokenizer_params(frozen), pp.to_model_range(batch['images']))
    return jax.lax.stop_gradient(jnp.concatenate(scales, axis=1))

  def _step(self, state: TrainState, frozen, batch, stage=None, key=None):
    # `key` (make_step's): PRNGKey(seed) as an argument, so that models of other seeds run the same
    # program (one compile per architecture in a study, with the persistent cache); the same draws.
    rng = self.step_key(state.step) if key is None else jax.random.fold_in(key, state.step)
    labels, ids = batch['labels'], self.tokens(frozen, batch)
    newest = None if stage is None else progressive_lib.newest_weight(stage, state.step)
    grad_fn = jax.value_and_grad(functools.partial(self.loss, stage=stage, newest=newest), has_aux=True)
    if self.accum_steps == 1:
      (_, metrics), grads = grad_fn(state.params, frozen, labels, ids, rng)
    else:
      k = self.accum_steps
      mb = lambda a: a.reshape((k, a.shape[0] // k) + a.shape[1:])

      def body(carry, xs):
        g_acc, m_acc = carry
        i, lab, idx = xs
        (_, m), g = grad_fn(state.params, frozen, lab, idx, jax.random.fold_in(rng, i))
        return (jax.tree_util.tree_map(jnp.add, g_acc, g), jax.tree_util.tree_map(jnp.add, m_acc, m)), None

      zeros_g = jax.tree_util.tree_map(jnp.zeros_like, state.params)
      # The metrics' structure from the loss itself, so a trainer may add its own (abstract: no cost).
      shapes = jax.eval_shape(lambda: grad_fn(state.params, frozen, mb(labels)[0], mb(ids)[0], rng)[0][1])
      zeros_m = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), (jnp.arange(k), mb(labels), mb(ids)))
      grads = jax.tree_util.tree_map(lambda g: g / k, grads)
      metrics = jax.tree_util.tree_map(lambda m: m / k, metrics)
    metrics['grad_norm'] = global_norm(grads)
    metrics['lr'] = self.lr(state.step)
    metrics['active_scales'] = jnp.int32(self.var_config.num_scales if stage is None else stage[0])
    if stage is not None:
      metrics['newest_scale_weight'] = newest
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, state.params, updates)
    ema = state.ema_params
    if ema is not None:
      d = ema_decay_at(self.ema_decay, state.step)
      ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, ema, params)
    return TrainState(state.step + 1, params, opt_state, ema), metrics

  def step_fn(self, stage=None):
    """The un-jitted step (state, frozen, batch) -> (state, metrics) of progressive `stage` (see
    `stage`; None: all scales), `frozen` = self.frozen(tokenizer weights). The frozen weights are an
    argument, not a constant, so a caller can compile it ahead of time on abstract shapes (for a TPU
    topology from a CPU host, say) with shardings of its choosing."""
    return functools.partial(self._step, stage=stage)

  def make_step(self, stage=None):
    """The jitted step (state, placed, batch) -> (state, metrics) with the state donated; `placed`
    (`place_frozen` of the tokenizer weights: the frozen weights and the seed's key) replicated. The batch
    holds 'labels' and either token 'ids' (B, L) or 'images' (B, H, W, 3) (uint8 pixels, or float32 in
    [-1, 1]), all split over the batch axes. Under progressive training each stage is its own program
    (its sequence length differs): `stage` of the steps it runs."""
    step = lambda state, placed, batch: self._step(state, placed['frozen'], batch, stage, key=placed['key'])
    return self.jit_step(step, pm.replicated(self.mesh))

  def place_frozen(self, vae_params):
    """make_step's second argument, replicated on the mesh, placed once and shared by every program: the
    frozen weights (`frozen`) and the key of the trainer's seed."""
    return jax.device_put({'frozen': self.frozen(vae_params), 'key': jax.random.PRNGKey(self.seed)},
                          pm.replicated(self.mesh))
