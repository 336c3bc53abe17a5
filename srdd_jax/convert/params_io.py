"""Saving and loading converted parameters: an Orbax tree plus a JSON description of the model."""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from srdd_jax import files
from srdd_jax.parallel import multihost
from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.transformer.config import VARConfig

MODEL_JSON = 'model.json'
PARAMS_DIR = 'params'


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with files.open(path, 'rb') as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def save_params(out_dir: str, params, *, kind: str, config: Any, source: str | None = None,
                overwrite: bool = False, extra: dict | None = None) -> str:
  """Writes `out_dir/params` (Orbax) and `out_dir/model.json` (kind, config, source, parameter count, and
  the keys of `extra`: a trained model's record, say).

  Refuses to touch an existing conversion unless `overwrite`, so a typo never destroys saved work.
  Written whole or not at all: into `out_dir`.partial, renamed into place once model.json is there, so
  a run killed in between leaves no half model to trip over (the next one removes the partial folder).
  In a bucket, which cannot rename, model.json is the commit: removed first, written last, so a run
  killed in between leaves no model (never a mix), and readers require it.
  Every process calls it (the Orbax save is collective); process 0 writes the rest.
  """
  out_dir = files.absolute(out_dir)
  if (files.exists(files.join(out_dir, PARAMS_DIR)) or files.exists(files.join(out_dir, MODEL_JSON))) \
      and not overwrite:
    raise FileExistsError(f'{out_dir} already holds converted parameters; pass overwrite=True '
                          '(--overwrite) to replace them, or choose another directory')
  cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
  # Shapes only: the leaves may be sharded over several processes (every process calls this).
  num_params = int(sum(int(np.prod(x.shape)) for x in _leaves(params)))
  meta = {
      'kind': kind,
      'config': cfg,
      'num_params': num_params,
      'source': files.absolute(source) if isinstance(source, str) and files.exists(source) else source,
      'source_sha256': file_sha256(source) if isinstance(source, str) and files.isfile(source) else None,
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='microseconds'),
      **(extra or {}),
  }
  main = jax.process_index() == 0
  if files.is_remote(out_dir):
    if main:
      files.remove(files.join(out_dir, MODEL_JSON))
      files.rmtree(files.join(out_dir, PARAMS_DIR))
    multihost.sync('save-params-begin')
    _orbax_save(files.join(out_dir, PARAMS_DIR), params)
    if main:
      files.write_json(files.join(out_dir, MODEL_JSON), meta)
    multihost.sync('save-params-done')
    return out_dir
  tmp = out_dir + '.partial'
  if main:
    files.rmtree(tmp)
  multihost.sync('save-params-begin')
  _orbax_save(files.join(tmp, PARAMS_DIR), params)
  if main:
    files.write_json(files.join(tmp, MODEL_JSON), meta)
    if files.exists(out_dir):  # overwrite: the old copy goes only once the new one is complete.
      for name in files.listdir(out_dir):  # Anything else kept there stays.
        if name not in (PARAMS_DIR, MODEL_JSON):
          files.rename(files.join(out_dir, name), files.join(tmp, name))
      old = out_dir + '.replaced'
      files.rmtree(old)
      files.rename(out_dir, old)
      files.rename(tmp, out_dir)
      files.rmtree(old)
    else:
      files.rename(tmp, out_dir)
  multihost.sync('save-params-done')
  return out_dir


def _orbax_save(path, params):
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, params)
  ckptr.wait_until_finished()


def _leaves(tree):
  return jax.tree_util.tree_leaves(tree)


def model_meta(directory: str) -> dict:
  """The model.json of a model directory, {} when it has none (yet) or it cannot be read."""
  try:
    return files.read_json(files.join(directory, MODEL_JSON))
  except (OSError, ValueError):
    return {}


def model_identity(directory: str) -> dict:
  """What tells one model directory (an export, a conversion, a tokenizer) from another, read without its
  weights: its path; model.json's creation time, parameter count and SHA-256 (the architecture, the
  training record with the tokenizer it learnt the ids of: an edit of any is a change); and the names,
  sizes and modification times of its parameter files (weights written again in place)."""
  meta = model_meta(directory)
  mpath = files.join(directory, MODEL_JSON)
  listed = []
  root = files.join(directory, PARAMS_DIR)
  if files.isdir(root):
    for folder, _, names in files.walk(root):
      for name in names:
        p = files.join(folder, name)
        listed.append([files.relpath(p, root), *(files.size_and_mtime(p) or (None, None))])
  return {'path': files.absolute(directory), 'created': meta.get('created'), 'num_params': meta.get('num_params'),
          'model_json_sha256': file_sha256(mpath) if files.isfile(mpath) else None,
          'params_files': hashlib.sha256(json.dumps(sorted(listed)).encode()).hexdigest() if listed else None}


def check_model_dir(directory: str, kind: str | None = None) -> dict:
  """The model.json of a model directory `save_params` wrote, its parameters present and of `kind`; no
  weight is read (what a dry run checks). FileNotFoundError or ValueError saying what is wrong."""
  directory = files.absolute(directory)
  mpath = files.join(directory, MODEL_JSON)
  if not files.isfile(mpath) or not files.isdir(files.join(directory, PARAMS_DIR)):
    raise FileNotFoundError(f'{directory} holds no converted parameters (expected {MODEL_JSON} and '
                            f'{PARAMS_DIR}/; create them with `python -m srdd_jax.tools.convert_var`)')
  try:
    meta = files.read_json(mpath)
  except ValueError as e:
    raise ValueError(f'{mpath} is not readable JSON ({e}); write the model again') from None
  if not isinstance(meta, dict):
    raise ValueError(f'{mpath} holds no model description')
  if kind is not None and meta.get('kind') != kind:
    raise ValueError(f'{directory} holds a {meta.get("kind")!r} model, not a {kind!r} one')
  return meta


def load_params(directory: str, kind: str | None = None):
  """Returns (model description dict, params as numpy arrays) saved by `save_params`."""
  directory = files.absolute(directory)
  ppath = files.join(directory, PARAMS_DIR)
  meta = check_model_dir(directory, kind)
  try:
    # As numpy, whatever devices wrote it: an export saved from a pod's sharded arrays records their
    # topology, and a plain restore on another machine (one GPU, a laptop) refuses it.
    checkpointer = ocp.PyTreeCheckpointer()
    meta_tree = checkpointer.metadata(ppath)
    tree = getattr(getattr(meta_tree, 'item_metadata', meta_tree), 'tree', meta_tree)  # Orbax versions differ.
    params = checkpointer.restore(ppath, restore_args=jax.tree_util.tree_map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
  except Exception as e:  # pylint: disable=broad-except  # Orbax/TensorStore: ValueError, OSError, ...
    reason = str(e).split(' [tensorstore_spec=')[0]
    raise ValueError(f'{ppath} cannot be read, its files are damaged or cut short ({reason[:300]}); write '
                     'it again (train export, convert_var)') from None
  return meta, params


def load_vqvae(directory: str):
  """(VQVAEConfig, params) of a converted tokenizer."""
  meta, params = load_params(directory, kind='vqvae')
  return VQVAEConfig(**meta['config']), params


def load_var(directory: str):
  """(VARConfig, params) of a converted transformer."""
  meta, params = load_params(directory, kind='var')
  return VARConfig(**meta['config']), params
