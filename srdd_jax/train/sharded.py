"""The skeleton every trainer shares (the transformer's, train/step.py; the tokenizer's,
train/tokenizer_step.py): the state built abstractly, sharded by the logical-axis rules and initialised in
place; the key of each step; one jitted step that donates the state; batches split over the batch axes.

A trainer supplies its boxed initial state (`boxed_state`) and its step function; everything placed on
the mesh is placed here, once, the same way for both.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import multihost


def global_norm(tree):
  """The gradient norm the metrics report (the clipping in the optimiser computes its own)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(tree)))


class ShardedTrainer:
  """State, step and batches of one trainer on one mesh. The step's randomness is
  `step_key(state.step)`, so a resumed run draws exactly what an uninterrupted one would."""

  def __init__(self, mesh, rules=pm.DEFAULT_RULES, seed: int = 0):
    self.mesh, self.rules, self.seed = mesh, tuple(rules), seed
    self.batch_sharding = NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))

  # --- state ------------------------------------------------------------------------------------

  def boxed_state(self, rng):
    """The initial state with its parameters boxed with their logical axes (traced, never run alone)."""
    raise NotImplementedError

  def init_compiler_options(self) -> dict | None:
    """XLA options of the initialiser's program (None: the defaults)."""
    return None

  def abstract_state(self):
    """Unboxed shapes of the state and its NamedShardings (parameters and optimiser moments follow the
    logical-axis rules; counters and statistics are replicated)."""
    boxed = jax.eval_shape(self.boxed_state, jax.random.PRNGKey(0))
    shardings = pm.param_shardings(boxed, self.mesh, self.rules)
    return nn.meta.unbox(boxed), shardings

  @functools.cached_property
  def state_shardings(self):
    return self.abstract_state()[1]

  @functools.cached_property
  def _init_fn(self):
    return jax.jit(lambda r: nn.meta.unbox(self.boxed_state(r)), out_shardings=self.state_shardings,
                   compiler_options=self.init_compiler_options())

  def init(self, rng):
    """The initial state, created directly in its shardings: no host holds the whole model."""
    return self._init_fn(rng)

  # --- the step ---------------------------------------------------------------------------------

  def step_key(self, step):
    return jax.random.fold_in(jax.random.PRNGKey(self.seed), step)

  def jit_step(self, fn, *frozen_shardings):
    """`fn` (state, *frozen, batch) -> (state, metrics) jitted: the state in its shardings and donated,
    the frozen arguments (weights the step reads but does not train) in `frozen_shardings`, the batch
    split over the batch axes, the metrics replicated. Frozen weights are arguments, never closed over:
    a closed-over array becomes a constant of the program (a bigger program, a slower compile, a copy
    in every program that closes over it)."""
    shardings = self.state_shardings
    return jax.jit(fn, in_shardings=(shardings, *frozen_shardings, self.batch_sharding),
                   out_shardings=(shardings, pm.replicated(self.mesh)), donate_argnums=0)

  # --- batches ----------------------------------------------------------------------------------

  def shard_batch(self, batch):
    """Places a global host batch on the mesh (single process)."""
    return jax.device_put(batch, self.batch_sharding)

  def local_rows(self, global_batch: int) -> tuple[slice, ...]:
    """The rows of each global batch that this process loads: its spans, in the batch's order."""
    return multihost.local_rows(self.batch_sharding, global_batch)

  def assemble_batch(self, local: dict, global_batch: int) -> dict:
    """This process's rows (numpy) -> the global batch on the mesh (any number of processes)."""
    return multihost.global_batch(self.batch_sharding, local, global_batch)
