"""The device mesh (data, fsdp, tensor) and the logical-axis rules that place parameters on it."""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from srdd_jax.config import ConfigError

if hasattr(jax, 'shard_map'):
  _legacy_shard_map = None
else:  # JAX before 0.7.
  from jax.experimental.shard_map import shard_map as _legacy_shard_map  # pylint: disable=ungrouped-imports

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis -> mesh axes. Configs may override; these fit the tokenizer and the transformer.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('conv_in', 'fsdp'),
    ('conv_out', 'tensor'),
    ('vq_embed', None),
    ('norm', None),
    ('layers', None),  # The stacked-blocks axis of nn.scan: every device holds every layer's slice.
    # Activations (maxtext's convention): the batch stays split over data and fsdp, so FSDP shards
    # parameters and optimiser state only and never replicates activations over its axis.
    ('activation_batch', ('data', 'fsdp')),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('activation_mlp', 'tensor'),
    ('activation_vocab', 'tensor'),
)


def resolve_mesh_shape(shape: Mapping[str, int] | Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills a single -1 so the product equals `num_devices`; errors name the offending axis."""
  sizes = [int(shape[a]) for a in MESH_AXES] if isinstance(shape, Mapping) else [int(s) for s in shape]
  if len(sizes) != len(MESH_AXES):
    raise ValueError(f'mesh shape {tuple(sizes)} must give one size per axis {MESH_AXES}')
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f'mesh shape {tuple(sizes)}: at most one axis may be -1')
  for a, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ValueError(f'mesh axis {a!r} has size {s}; sizes are positive or -1 (fill)')
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f'mesh shape {tuple(sizes)}: {num_devices} devices are not divisible by {known}')
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, '
                     f'but {num_devices} are available')
  return tuple(sizes)


def make_mesh(shape: Mapping[str, int] | Sequence[int] = (-1, 1, 1), devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else list(devices)
  sizes = resolve_mesh_shape(shape, len(devices))
  axis_type = getattr(jax.sharding, 'AxisType', None)
  try:
    if axis_type is None:
      raise TypeError('this JAX has no axis types')
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(axis_type.Auto,) * len(MESH_AXES), devices=devices)
  except TypeError:  # Older JAX: no axis types, every axis is auto.
    return jax.sharding.Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def param_shardings(abstract_boxed_params, mesh, rules=DEFAULT_RULES):
  """NamedShardings of a boxed parameter tree (from `jax.eval_shape(init)`) under `rules`.

  A dimension that the mapped mesh axes do not divide (the 3 RGB channels of a conv, say) stays
  replicated instead of failing: such parameters are tiny.
  """
  specs = nn.get_partition_spec(abstract_boxed_params)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, list(rules))
  shapes = nn.meta.unbox(abstract_boxed_params)

  def fit(sharding, leaf):
    spec = list(sharding.spec) + [None] * (len(leaf.shape) - len(sharding.spec))
    for i, axes in enumerate(spec):
      if axes is None:
        continue
      n = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
      if leaf.shape[i] % n:
        spec[i] = None
    return NamedSharding(mesh, PartitionSpec(*spec))

  return jax.tree_util.tree_map(fit, shardings, shapes)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def mesh_from_config(config, devices=None) -> jax.sharding.Mesh:
  """The mesh of config.mesh; a ConfigError naming the key when it cannot be built."""
  shape = config.get('mesh') or {'data': -1, 'fsdp': 1, 'tensor': 1}
  try:
    return make_mesh(dict(shape), devices)
  except ValueError as e:
    raise ConfigError(f'config.mesh: {e}') from e


def rules_from_config(config) -> tuple:
  """config.mesh_rules as ((logical axis, mesh axes), ...); () gives DEFAULT_RULES."""
  rules = tuple(tuple(r) for r in (config.get('mesh_rules', ()) or ()))
  for r in rules:
    if len(r) != 2 or not isinstance(r[0], str):
      raise ConfigError(f'config.mesh_rules: {r!r} is not a (logical axis, mesh axes) pair')
  return rules or DEFAULT_RULES


def data_parallel_size(mesh) -> int:
  """Devices a batch is split over (the data and fsdp axes)."""
  return mesh.shape['data'] * mesh.shape['fsdp']


_ACTIVATIONS: contextvars.ContextVar = contextvars.ContextVar('srdd_activation_sharding', default=None)


@contextlib.contextmanager
def activation_sharding(mesh, rules=DEFAULT_RULES):
  """While tracing inside this context, `constrain` pins activations to `mesh` by the logical `rules`;
  outside it `constrain` does nothing (single device, tests, the reference checks)."""
  token = _ACTIVATIONS.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVATIONS.reset(token)


def activation_context():
  """(mesh, rules) of the enclosing `activation_sharding`, or None."""
  return _ACTIVATIONS.get()


def logical_spec(mesh, rules, names: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
  """The PartitionSpec of an array of `shape` whose axes have logical `names`. A name no rule mentions
  is left to the compiler (UNCONSTRAINED); a dimension its mesh axes do not divide is replicated."""
  table = {}
  for name, axes in rules:
    table.setdefault(name, axes)  # The first rule of a name wins, as in Flax.
  spec = [table.get(n, PartitionSpec.UNCONSTRAINED) if n is not None else None for n in names]
  for i, axes in enumerate(spec):
    if axes is None or axes is PartitionSpec.UNCONSTRAINED:
      continue
    n = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    if shape[i] % n:
      spec[i] = None
  return PartitionSpec(*spec)


def constrain(x, names: Sequence[str | None]):
  """with_sharding_constraint of x by logical axis `names`, under `activation_sharding`; outside it,
  x unchanged."""
  ctx = _ACTIVATIONS.get()
  if ctx is None:
    return x
  mesh, rules = ctx
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_spec(mesh, rules, names, x.shape)))


def shard_map(fn, mesh, in_specs, out_specs):
  """`jax.shard_map` without replication checks, on the JAX versions we support (older ones have it
  under jax.experimental with another keyword)."""
  if _legacy_shard_map is None:
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  return _legacy_shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
