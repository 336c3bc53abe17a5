"""Strict mapping of PyTorch state dicts onto Flax parameter trees.

One rule serves every model of the project: a PyTorch key `a.b.0.c.weight` names the Flax module
path `a/b_0/c`; `weight` becomes whichever of `kernel`, `scale` or `embedding` that module has, other
leaf names stay. Conv kernels go OIHW -> HWIO and linear kernels (out, in) -> (in, out). Every key and
shape is checked against the abstract parameters of the model, and all problems are reported at once.
"""
from __future__ import annotations

import dataclasses
import os
import re
import zipfile
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from srdd_jax import files

_WEIGHT_LEAVES = ('kernel', 'scale', 'embedding')


class StateDictMismatch(ValueError):
  """Raised with the full list of unknown, missing and mis-shaped keys."""


def load_state_dict(source: str | os.PathLike | Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """Reads a state dict from a `.pth`/`.pt` file, an `.npz` file or a mapping.

  `prefix` (for example 'vae/' in the reference `.npz` files) selects and strips the keys that
  start with it. Values are returned as they are (numpy arrays, or anything with a `.shape`).
  """
  if isinstance(source, Mapping):
    items = dict(source)
  else:
    path = os.fspath(source)
    if not files.exists(path):
      raise FileNotFoundError(f'state dict file not found: {path}')
    if path.endswith('.npz'):
      try:
        with files.np_load(path, allow_pickle=False) as z:
          keys = [k for k in z.files if k.startswith(prefix)] if prefix else list(z.files)
          items = {k: z[k] for k in keys}
      except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise StateDictMismatch(f'{path} is not a readable .npz of arrays ({type(e).__name__}); give the '
                                'file written by the converter') from e
    else:
      items = _load_torch(path)
  if prefix:
    items = {k[len(prefix):]: v for k, v in items.items() if k.startswith(prefix)}
    if not items:
      raise StateDictMismatch(f'no key of {source!r} starts with the prefix {prefix!r}')
  return items


def _load_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f'reading the PyTorch checkpoint {path} needs torch, which srdd_jax does not install. '
        'Install it once for the conversion (for example `pip install torch`), or pass a `.npz` '
        'of the state dict instead.') from e
  try:
    with files.open(path, 'rb') as f:
      obj = torch.load(f, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (torch raises many kinds for a bad file)
    raise StateDictMismatch(f'{path} is not a readable PyTorch checkpoint ({type(e).__name__}: '
                            f'{str(e).splitlines()[0][:200] if str(e) else ""})') from e
  # Training checkpoints wrap the weights; released VAR files are the plain state dict.
  for wrapper in ('state_dict', 'model', 'module'):
    if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
      obj = obj[wrapper]
  if not isinstance(obj, dict):
    raise StateDictMismatch(f'{path} does not hold a state dict (found {type(obj).__name__})')
  out = {}
  for k, v in obj.items():
    if hasattr(v, 'detach'):
      v = v.detach().cpu()
      out[k] = v.float().numpy() if v.is_floating_point() else v.numpy()
    else:
      out[k] = np.asarray(v)
  return out


def torch_key_to_module_path(key: str) -> tuple[tuple[str, ...], str]:
  """'encoder.down.0.block.1.conv2.weight' -> (('encoder', 'down_0', 'block_1', 'conv2'), 'weight')."""
  parts = key.split('.')
  leaf, mods = parts[-1], []
  for p in parts[:-1]:
    if p.isdigit() and mods:
      mods[-1] = f'{mods[-1]}_{p}'
    else:
      mods.append(p)
  return tuple(mods), leaf


def flatten_params(tree) -> dict[tuple[str, ...], Any]:
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    flat[tuple(str(getattr(p, 'key', p)) for p in path)] = leaf
  return flat


def unflatten_params(flat: Mapping[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


def default_transform(flax_leaf: str, value_ndim: int) -> Callable[[np.ndarray], np.ndarray]:
  if flax_leaf == 'kernel' and value_ndim == 4:
    return lambda a: np.transpose(a, (2, 3, 1, 0))  # OIHW -> HWIO
  if flax_leaf == 'kernel' and value_ndim == 2:
    return lambda a: np.transpose(a, (1, 0))  # (out, in) -> (in, out)
  return lambda a: a


@dataclasses.dataclass
class KeyMap:
  """How each PyTorch key lands in the Flax tree."""
  targets: dict[str, tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray]]]
  dropped: list[str]


def _shape_after(transform, shape):
  # A zero-stride view: the transform's output shape without allocating the array.
  return transform(np.broadcast_to(np.zeros((), np.bool_), shape)).shape


def map_state_dict(
    state_shapes: Mapping[str, Iterable[int]],
    abstract_params,
    *,
    drop: Iterable[str] = (),
    rename: Callable[[str], str] | None = None,
    what: str = 'state dict',
) -> KeyMap:
  """Plans the conversion of `state_shapes` (key -> shape) onto `abstract_params`.

  Raises StateDictMismatch listing every unexpected key, every Flax parameter no key fills, and every
  shape that does not match after the layout transform. Keys matching a regular expression of `drop`
  (known buffers, matched whole) are skipped.
  """
  expected = flatten_params(abstract_params)
  modules: dict[tuple[str, ...], set[str]] = {}
  for path in expected:
    modules.setdefault(path[:-1], set()).add(path[-1])
  drop_res = [re.compile(p) for p in drop]
  targets, dropped = {}, []
  unexpected, misshaped, filled = [], [], {}
  wrong_shape_paths = set()  # Reported as mis-shaped, so not again as missing.
  for key in sorted(state_shapes):
    if any(r.fullmatch(key) for r in drop_res):
      dropped.append(key)
      continue
    mod, leaf = torch_key_to_module_path(rename(key) if rename else key)
    leaves = modules.get(mod, set())
    if leaf == 'weight':
      cands = [l for l in _WEIGHT_LEAVES if l in leaves]
      flax_leaf = cands[0] if len(cands) == 1 else None
    else:
      flax_leaf = leaf if leaf in leaves else None
    if flax_leaf is None:
      unexpected.append(key)
      continue
    path = mod + (flax_leaf,)
    shape = tuple(int(s) for s in state_shapes[key])
    transform = default_transform(flax_leaf, len(shape))
    got = _shape_after(transform, shape)
    want = tuple(expected[path].shape)
    if got != want:
      wrong_shape_paths.add(path)
      misshaped.append(f'{key}: shape {shape} (as {"/".join(path)}: {got}) but the model expects {want}')
      continue
    if path in filled:
      unexpected.append(f'{key} (fills {"/".join(path)} again, already filled by {filled[path]})')
      continue
    filled[path] = key
    targets[key] = (path, transform)
  missing = ['/'.join(p) + f' {tuple(expected[p].shape)}' for p in expected
             if p not in filled and p not in wrong_shape_paths]
  if unexpected or missing or misshaped:
    lines = [f'the {what} does not match the model:']
    if unexpected:
      lines.append(f'  {len(unexpected)} unexpected key(s):')
      lines += [f'    {k}' for k in unexpected]
    if missing:
      lines.append(f'  {len(missing)} missing parameter(s) (no key fills them):')
      lines += [f'    {k}' for k in missing]
    if misshaped:
      lines.append(f'  {len(misshaped)} key(s) with a wrong shape:')
      lines += [f'    {k}' for k in misshaped]
    raise StateDictMismatch('\n'.join(lines))
  return KeyMap(targets, dropped)


def convert_state_dict(state: Mapping[str, Any], abstract_params, **kwargs) -> dict:
  """Converts arrays of `state` into a Flax parameter tree shaped like `abstract_params` (float32)."""
  km = map_state_dict({k: np.shape(v) for k, v in state.items()}, abstract_params, **kwargs)
  expected = flatten_params(abstract_params)
  flat = {}
  for key, (path, transform) in km.targets.items():
    dtype = getattr(expected[path], 'dtype', np.float32)
    flat[path] = np.ascontiguousarray(transform(np.asarray(state[key]))).astype(dtype)
  return unflatten_params(flat)
