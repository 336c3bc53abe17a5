"""The device mesh (data, fsdp, tensor) and the logical-axis rules that place parameters on it."""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
import re
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from srdd_jax import files
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


def resolve_mesh_shape(shape: Mapping[str, int] | Sequence[int], num_devices: int,
                       num_slices: int = 1) -> tuple[int, ...]:
  """Fills the -1 sizes so the product equals `num_devices`; errors name the offending axis.

  One -1 takes what the other axes leave. data and fsdp both -1 is the pod default (maxtext's): fsdp
  spans every chip of a slice and data goes across the `num_slices` slices (1 on one slice or a GPU
  host), so parameters are sharded as finely as the interconnect allows on any slice size.
  """
  sizes = [int(shape[a]) for a in MESH_AXES] if isinstance(shape, Mapping) else [int(s) for s in shape]
  if len(sizes) != len(MESH_AXES):
    raise ValueError(f'mesh shape {tuple(sizes)} must give one size per axis {MESH_AXES}')
  for a, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ValueError(f'mesh axis {a!r} has size {s}; sizes are positive or -1 (fill)')
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if fill == [0, 1]:
    if num_devices % (num_slices * sizes[2]):
      raise ValueError(f'mesh shape {tuple(sizes)}: {num_devices} devices in {num_slices} slice(s) are not '
                       f'divisible by tensor={sizes[2]} per slice')
    return (num_slices, num_devices // (num_slices * sizes[2]), sizes[2])
  if len(fill) > 1:
    raise ValueError(f'mesh shape {tuple(sizes)}: at most one axis may be -1 (or data and fsdp both: fsdp '
                     'over each slice, data across slices)')
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f'mesh shape {tuple(sizes)}: {num_devices} devices are not divisible by {known}')
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, '
                     f'but {num_devices} are available')
  return tuple(sizes)


def num_slices(devices) -> int:
  """Slices (TPU pods joined by the data-centre network) among `devices`; 1 where there is no such notion."""
  return len({getattr(d, 'slice_index', 0) or 0 for d in devices})


# A TPU slice as JAX names it: the generation, then the chips along each axis (v5e:2x2, v5p:2x2x2).
TOPOLOGY_NAME = re.compile(r'v\d+[a-z]*:\d+(x\d+){1,2}')


def check_topology_name(topology: str, flag: str) -> None:
  """The form of a topology name, checked before libtpu is loaded (it prints its own trace first)."""
  if not TOPOLOGY_NAME.fullmatch(topology):
    raise ConfigError(f'{flag}={topology!r}: a TPU slice as <generation>:<chips per axis>, e.g. v5p:2x2x2 or '
                      'v5e:2x2')


def topology_devices(topology: str, flag: str = '--aot', num_slices: int = 1):
  """The devices of a TPU topology ('v5e:2x2', 'v5p:2x2x2'; `num_slices` of them joined by the data-centre
  network), described without any TPU attached; errors name `flag`, what gave the topology."""
  # libtpu takes a machine-wide lockfile when it loads, so while any other JAX process runs here (a
  # training job, the test suite) the description fails with ABORTED. Compiling ahead of time touches no
  # TPU, so sharing the library is safe; the variable is read when libtpu loads, i.e. on the first call.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    extra = {'num_slices': num_slices} if num_slices > 1 else {}
    desc = topologies.get_topology_desc(platform='tpu', topology_name=topology, **extra)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'{flag} {topology!r}: cannot describe this TPU topology ({type(e).__name__}: '
                      f'{str(e).splitlines()[0] if str(e) else ""}); is libtpu installed '
                      "(pip install -e '.[tpu]') and is the name like v5p:2x2x2?") from None
  return list(desc.devices)


# Set to a TPU topology ('v5p:2x4x4', or 'v5p:2x2x2,slices=2'), CPU processes order their devices as
# JAX orders that pod's chips: each process plays one host (its local devices, the host's chips), so a
# multi-process CPU run meets the host row layout, collectives and resume of the pod. A rehearsal aid;
# unset on real hardware.
ENV_REHEARSE = 'SRDD_REHEARSE_TOPOLOGY'
ENV_REHEARSE_LAYOUT = 'SRDD_REHEARSE_LAYOUT'


def device_grid(sizes: Sequence[int], devices) -> np.ndarray:
  """`devices` as a (data, fsdp, tensor) array, laid out by JAX's device-mesh builder (the interconnect's
  rings on TPU). Several slices (devices with distinct slice_index) put `data` across slices, over the
  data-centre network, and the rest inside each slice. An axis that fits no physical axis of the torus
  (fsdp 8 on a 4x4x4 v5p-128) is laid over split physical axes rather than refused."""
  sizes = tuple(int(s) for s in sizes)
  slices = sorted({getattr(d, 'slice_index', 0) or 0 for d in devices})
  if len(slices) > 1:
    if sizes[0] % len(slices):
      raise ValueError(f'mesh axis data={sizes[0]} must be a multiple of the {len(slices)} slices: data is the '
                       'axis across slices (fsdp and tensor stay inside one)')
    ici = (sizes[0] // len(slices),) + sizes[1:]
    build = lambda split: mesh_utils.create_hybrid_device_mesh(ici, (len(slices), 1, 1), devices,
                                                               allow_split_physical_axes=split)
  else:
    build = lambda split: mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=split)
  try:
    return build(False)
  except NotImplementedError:
    try:
      grid = build(True)
    except (NotImplementedError, ValueError, AssertionError) as e:
      raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} cannot be laid out on these {len(devices)} '
                       f'{devices[0].device_kind} devices ({str(e).splitlines()[0][:200]})') from None
    logging.info('mesh %s: an axis spans split physical axes of the torus (no axis of it has that size)',
                 dict(zip(MESH_AXES, sizes)))
    return grid


@dataclasses.dataclass(frozen=True)
class DescribedDevice:
  """A chip as libtpu describes it: what JAX's device-mesh builder reads (coordinates, host, slice)."""
  id: int
  process_index: int
  coords: tuple
  core_on_chip: int = 0
  slice_index: int = 0
  device_kind: str = 'TPU v5'
  platform: str = 'tpu'


def describe(devices) -> list[dict]:
  """The fields of DescribedDevice of each device (JSON), so processes can lay out a slice without libtpu."""
  return [{'id': int(d.id), 'process_index': int(d.process_index), 'coords': [int(c) for c in d.coords],
           'core_on_chip': int(getattr(d, 'core_on_chip', 0) or 0),
           'slice_index': int(getattr(d, 'slice_index', 0) or 0), 'device_kind': d.device_kind,
           'platform': d.platform} for d in devices]


def rehearsal_devices(topology: str, devices) -> tuple[list, dict]:
  """For ENV_REHEARSE: the TPU devices of `topology` (each chip's coordinates, host and slice, as libtpu
  describes them; from the file ENV_REHEARSE_LAYOUT names where set, which `describe` wrote, so a
  rehearsal's processes need not each load libtpu), and `devices` matched to them host by host (process
  p's i-th device by id plays host p's i-th chip by id). Returns (tpu devices, {tpu id: real device})."""
  layout = os.environ.get(ENV_REHEARSE_LAYOUT)
  if layout:
    tpu = [DescribedDevice(**{**r, 'coords': tuple(r['coords'])}) for r in files.read_json(layout)]
  else:
    name, _, opts = topology.partition(',')
    slices = 1
    if opts:
      key, _, value = opts.partition('=')
      if key != 'slices' or not value.isdigit() or int(value) < 1:
        raise ValueError(f'{ENV_REHEARSE}={topology!r}: expected TOPOLOGY or TOPOLOGY,slices=N')
      slices = int(value)
    tpu = topology_devices(name, ENV_REHEARSE, num_slices=slices)
  by_host = lambda ds: {p: sorted((d for d in ds if d.process_index == p), key=lambda d: d.id)
                        for p in sorted({d.process_index for d in ds})}
  tpu_hosts, hosts = by_host(tpu), by_host(devices)
  shape = lambda h: [len(v) for v in h.values()]
  if shape(tpu_hosts) != shape(hosts):
    raise ValueError(f'{ENV_REHEARSE}={topology!r}: {len(tpu_hosts)} hosts of {shape(tpu_hosts)[0]} chips, but '
                     f'this run has {len(hosts)} processes with {shape(hosts)} devices')
  stand_in = {t.id: d for p in hosts for t, d in zip(tpu_hosts[p], hosts[p])}
  return tpu, stand_in


def make_mesh(shape: Mapping[str, int] | Sequence[int] = (-1, 1, 1), devices=None) -> jax.sharding.Mesh:
  rehearse = os.environ.get(ENV_REHEARSE) if devices is None else None
  devices = jax.devices() if devices is None else list(devices)
  tpu, stand_in = rehearsal_devices(rehearse, devices) if rehearse else (None, None)
  sizes = resolve_mesh_shape(shape, len(devices), num_slices(tpu or devices))
  if rehearse:
    grid = np.vectorize(lambda t: stand_in[t.id], otypes=[object])(device_grid(sizes, tpu))
    logging.info('mesh %s: devices ordered as JAX orders the chips of %s (%s)', dict(zip(MESH_AXES, sizes)),
                 rehearse, ENV_REHEARSE)
  else:
    grid = device_grid(sizes, devices)
  axis_type = getattr(jax.sharding, 'AxisType', None)
  if axis_type is None:  # Older JAX: no axis types, every axis is auto.
    return jax.sharding.Mesh(grid, MESH_AXES)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(axis_type.Auto,) * len(MESH_AXES))


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
