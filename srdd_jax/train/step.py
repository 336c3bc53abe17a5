"""Train state, sharded initialisation and the jitted, donated train step."""
from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import multihost
from srdd_jax.tokenizer.api import Tokenizer
from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.train import progressive as progressive_lib
from srdd_jax.train.progressive import Progressive
from srdd_jax.train.optimizer import OptimConfig, lr_schedule, var_optimizer
from srdd_jax.transformer.config import VARConfig
from srdd_jax.transformer.loss import cross_entropy_metrics
from srdd_jax.transformer.model import VAR

@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None


class Trainer:
  """Builds the sharded state and the train step for one configuration on one mesh.

  The step's randomness (label dropout, drop path) is `fold_in(PRNGKey(seed), step)`, so a resumed run
  draws exactly what an uninterrupted one would.
  """

  def __init__(self, var_config: VARConfig, vae_config: VQVAEConfig, optim: OptimConfig, mesh,
               rules=pm.DEFAULT_RULES, accum_steps: int = 1, ema_decay: float = 0.0, seed: int = 0,
               progressive: Progressive | None = None):
    if accum_steps < 1:
      raise ValueError(f'accum_steps={accum_steps}: must be >= 1')
    if progressive is not None and progressive.num_scales != var_config.num_scales:
      raise ValueError(f'progressive schedule for {progressive.num_scales} scales, model has '
                       f'{var_config.num_scales}')
    self.progressive = progressive
    self.var_config, self.vae_config, self.optim = var_config, vae_config, optim
    self.mesh, self.rules = mesh, tuple(rules)
    self.accum_steps, self.ema_decay, self.seed = accum_steps, ema_decay, seed
    self.model = VAR(var_config)
    self.tokenizer = Tokenizer(vae_config)
    self.tx = var_optimizer(optim)
    self.lr = lr_schedule(optim)
    self.batch_sharding = NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))

  # --- state ------------------------------------------------------------------------------------

  def _boxed_state(self, rng):
    c = self.var_config
    x = jnp.zeros((1, c.seq_len - 1, c.z_channels), jnp.float32)
    params = self.model.init(rng, jnp.zeros((1,), jnp.int32), x)['params']
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=self.tx.init(params),
                      ema_params=params if self.ema_decay > 0 else None)

  def abstract_state(self):
    """Unboxed shapes of the state and its NamedShardings (parameters and optimiser moments follow
    the logical-axis rules; counters are replicated)."""
    boxed = jax.eval_shape(self._boxed_state, jax.random.PRNGKey(0))
    shardings = pm.param_shardings(boxed, self.mesh, self.rules)
    return nn.meta.unbox(boxed), shardings

  def init(self, rng) -> TrainState:
    """Initialises the state directly in its shardings; no host holds the whole model."""
    _, shardings = self.abstract_state()
    return jax.jit(lambda r: nn.meta.unbox(self._boxed_state(r)), out_shardings=shardings)(rng)

  # --- the step ---------------------------------------------------------------------------------

  def stage(self, step: int):
    """The static stage of the program that trains `step` (progressive.Progressive.stage), or None
    when every step trains all scales."""
    return None if self.progressive is None else self.progressive.stage(int(step))

  def _loss(self, params, vae_params, labels, ids, rng, stage=None, newest=None):
    c = self.var_config
    scales = [ids[:, b:e] for b, e in c.begin_ends]
    x_in = self.tokenizer.idx_to_var_input(vae_params, scales)
    # Activations stay split over the batch axes (FSDP shards parameters, never activations).
    with pm.activation_sharding(self.mesh, self.rules):
      logits = self.model.apply({'params': params}, labels, x_in, train=True, rngs={'dropout': rng},
                                num_scales=None if stage is None else stage[0])
    return cross_entropy_metrics(logits, ids, c, newest)

  def tokens(self, vae_params, batch):
    """The batch's token ids (B, L): given, or encoded on the fly by the frozen tokenizer (float32)."""
    if 'ids' in batch:
      return batch['ids']
    scales = self.tokenizer.img_to_idx(vae_params, batch['images'].astype(jnp.float32))
    return jax.lax.stop_gradient(jnp.concatenate(scales, axis=1))

  def _step(self, state: TrainState, vae_params, batch, stage=None):
    rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), state.step)
    labels, ids = batch['labels'], self.tokens(vae_params, batch)
    newest = None if stage is None else progressive_lib.newest_weight(stage, state.step)
    grad_fn = jax.value_and_grad(functools.partial(self._loss, stage=stage, newest=newest), has_aux=True)
    if self.accum_steps == 1:
      (_, metrics), grads = grad_fn(state.params, vae_params, labels, ids, rng)
    else:
      k = self.accum_steps
      mb = lambda a: a.reshape((k, a.shape[0] // k) + a.shape[1:])

      def body(carry, xs):
        g_acc, m_acc = carry
        i, lab, idx = xs
        (_, m), g = grad_fn(state.params, vae_params, lab, idx, jax.random.fold_in(rng, i))
        return (jax.tree_util.tree_map(jnp.add, g_acc, g), jax.tree_util.tree_map(jnp.add, m_acc, m)), None

      zeros_g = jax.tree_util.tree_map(jnp.zeros_like, state.params)
      # The metrics' structure from the loss itself, so a trainer may add its own (abstract: no cost).
      shapes = jax.eval_shape(lambda: grad_fn(state.params, vae_params, mb(labels)[0], mb(ids)[0], rng)[0][1])
      zeros_m = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), (jnp.arange(k), mb(labels), mb(ids)))
      grads = jax.tree_util.tree_map(lambda g: g / k, grads)
      metrics = jax.tree_util.tree_map(lambda m: m / k, metrics)
    metrics['grad_norm'] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
    metrics['lr'] = self.lr(state.step)
    metrics['active_scales'] = jnp.int32(self.var_config.num_scales if stage is None else stage[0])
    if stage is not None:
      metrics['newest_scale_weight'] = newest
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, state.params, updates)
    ema = state.ema_params
    if ema is not None:
      d = self.ema_decay
      ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, ema, params)
    return TrainState(state.step + 1, params, opt_state, ema), metrics

  def step_fn(self, stage=None):
    """The un-jitted step (state, vae_params, batch) -> (state, metrics) of progressive `stage` (see
    `stage`; None: all scales). The tokenizer weights are an argument here, not a constant, so a caller
    can compile it ahead of time on abstract shapes (for a TPU topology from a CPU host, say) with
    shardings of its choosing."""
    return functools.partial(self._step, stage=stage)

  def make_step(self, vae_params, stage=None):
    """The jitted step (state, batch) -> (state, metrics) with the state donated; `vae_params` (the
    frozen tokenizer) are closed over, replicated. The batch holds 'labels' and either token 'ids'
    (B, L) or 'images' (B, H, W, 3) in [-1, 1], all split over the batch axes. Under progressive
    training each stage is its own program (its sequence length differs): `stage` of the steps it runs."""
    _, shardings = self.abstract_state()
    vae_params = jax.device_put(vae_params, pm.replicated(self.mesh))
    step = jax.jit(lambda s, b: self.step_fn(stage)(s, vae_params, b), in_shardings=(shardings, self.batch_sharding),
                   out_shardings=(shardings, pm.replicated(self.mesh)), donate_argnums=0)
    return step

  def shard_batch(self, batch):
    """Places a global host batch on the mesh (single process)."""
    return jax.device_put(batch, self.batch_sharding)

  def local_rows(self, global_batch: int) -> slice:
    """The rows of each global batch that this process loads."""
    return multihost.local_rows(self.batch_sharding, global_batch)

  def assemble_batch(self, local: dict, global_batch: int) -> dict:
    """This process's rows (numpy) -> the global batch on the mesh (any number of processes)."""
    return multihost.global_batch(self.batch_sharding, local, global_batch)
