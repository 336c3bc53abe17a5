"""pytorch-fid's FID Inception weights -> Flax parameters of `srdd_jax.evaluation.inception`.

(A checkpoint format, but it needs the network's shapes, so it sits beside the network.)

Weights come only from a file the user gives: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`,
whose SHA-256 must be the published one, or an `.npz` written by `save_npz` from such a file (it
records the source hash and a digest of its own arrays, both checked on load). Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

import numpy as np

from srdd_jax import files
from srdd_jax.convert import state_dict as sd
from srdd_jax.convert.params_io import file_sha256
from srdd_jax.evaluation import inception

FID_WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   + FID_WEIGHTS_FILE)
# Torch-hub names carry the first 8 hex digits of the file's SHA-256 ('6726825d'); the full digest is
# the one published with pytorch-fid's release file (95,628,359 bytes).
FID_WEIGHTS_SHA256 = '6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2'

NPZ_KIND = 'fid_inception_weights'
NPZ_PREFIX = 'inception/'
# BatchNorm's step counter: a buffer of the checkpoint, not part of the function.
INCEPTION_BUFFERS = (r'.*\.num_batches_tracked',)


class WeightsHashMismatch(ValueError):
  """The weights file is not the published pytorch-fid file (or a faithful conversion of it)."""


def verify_sha256(path: str | os.PathLike, expected: str | None = None) -> str:
  """Returns the file's SHA-256; raises WeightsHashMismatch naming the file and both digests.

  `expected` defaults to the published digest (looked up at call time).
  """
  path = os.fspath(path)
  expected = expected or FID_WEIGHTS_SHA256
  if not files.isfile(path):
    raise FileNotFoundError(f'Inception weights file not found: {path}')
  got = file_sha256(path)
  if got != expected:
    raise WeightsHashMismatch(
        f'{path} is not pytorch-fid\'s {FID_WEIGHTS_FILE}: its SHA-256 is {got}, the published file\'s '
        f'is {expected}. FID numbers are only comparable with the exact published weights '
        f'({FID_WEIGHTS_URL}).')
  return got


def _abstract():
  return inception.abstract_params()


def map_inception(state_shapes: Mapping[str, Any]) -> sd.KeyMap:
  """Checks every key and shape of an FID Inception state dict; raises StateDictMismatch listing all problems."""
  return sd.map_state_dict(state_shapes, _abstract(), drop=INCEPTION_BUFFERS,
                           what='FID Inception state dict')


def convert_inception(source: str | os.PathLike | Mapping[str, Any], prefix: str = '') -> dict:
  """Converts a PyTorch-layout FID Inception state dict (a mapping, or a file read *without* any hash
  check) to Flax params (float32). Use `load_inception` for user-given weight files."""
  state = sd.load_state_dict(source, prefix=prefix)
  return sd.convert_state_dict(state, _abstract(), drop=INCEPTION_BUFFERS,
                               what='FID Inception state dict')


def arrays_digest(state: Mapping[str, Any]) -> str:
  """SHA-256 over the sorted keys, dtypes, shapes and bytes of a state dict's arrays."""
  h = hashlib.sha256()
  for k in sorted(state):
    a = np.ascontiguousarray(np.asarray(state[k]))
    h.update(f'{k}|{a.dtype.str}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def read_pth(path: str | os.PathLike, expected_sha256: str | None = None
             ) -> tuple[str, dict[str, np.ndarray]]:
  """(SHA-256, state dict) of the published `.pth`, hash checked before torch reads it."""
  sha = verify_sha256(path, expected_sha256)
  state = sd.load_state_dict(path)
  map_inception({k: np.shape(v) for k, v in state.items()})  # A strict check before anything is saved.
  return sha, state


def save_npz(out: str | os.PathLike, state: Mapping[str, Any], *, source_sha256: str,
             source: str = FID_WEIGHTS_FILE, overwrite: bool = False) -> str:
  """Writes the PyTorch-layout state dict as `inception/<key>` float32 arrays plus a `meta` JSON entry
  (kind, source file and SHA-256, digest of the arrays), so no torch is needed afterwards."""
  out = os.fspath(out)
  if not out.endswith('.npz'):
    raise ValueError(f'the converted Inception weights are written as .npz; got {out}')
  if files.exists(out) and not overwrite:
    raise FileExistsError(f'{out} exists; pass overwrite=True (--overwrite) to replace it')
  arrays = {k: np.asarray(v, np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating)
            else np.asarray(v) for k, v in state.items()}
  meta = {'kind': NPZ_KIND, 'source': files.basename(source), 'source_sha256': source_sha256,
          'arrays_sha256': arrays_digest(arrays), 'layout': 'PyTorch state dict (OIHW conv, (out, in) fc)'}
  files.save_npz(out, meta=np.array(json.dumps(meta)), **{NPZ_PREFIX + k: v for k, v in arrays.items()})
  return out


def load_inception(path: str | os.PathLike, *, allow_unverified: bool = False
                   ) -> tuple[dict, dict[str, Any]]:
  """Flax params of FID Inception weights from a user-given file, and a description of their provenance.

  `.pth`: the file's SHA-256 must be the published one. `.npz` from `save_npz`: its recorded source
  hash must be the published one and its arrays must match their recorded digest. Anything else (for
  example the random-weight reference files) raises WeightsHashMismatch unless `allow_unverified`, and
  then `info['verified']` is False: such weights must never produce a number called FID.
  """
  path = os.fspath(path)
  if not files.isfile(path):
    raise FileNotFoundError(f'Inception weights file not found: {path}')
  if not path.endswith('.npz'):
    got = file_sha256(path) if allow_unverified else verify_sha256(path)
    params = convert_inception(sd.load_state_dict(path))
    return params, {'path': path, 'sha256': got, 'verified': got == FID_WEIGHTS_SHA256}
  state = sd.load_state_dict(path, prefix=NPZ_PREFIX)
  meta: dict[str, Any] = {}
  with files.np_load(path, allow_pickle=False) as z:
    if 'meta' in z.files:
      try:
        meta = json.loads(str(z['meta']))
      except json.JSONDecodeError:
        meta = {}
  problem = None
  if meta.get('kind') != NPZ_KIND:
    problem = (f'{path} is not an .npz written from the published weights (meta kind '
               f'{meta.get("kind")!r}, expected {NPZ_KIND!r}); convert {FID_WEIGHTS_FILE} with '
               '`python -m srdd_jax.tools.convert_inception`')
  elif meta.get('source_sha256') != FID_WEIGHTS_SHA256:
    problem = (f'{path} was converted from a file with SHA-256 {meta.get("source_sha256")}, not from '
               f'the published {FID_WEIGHTS_FILE} (SHA-256 {FID_WEIGHTS_SHA256})')
  else:
    digest = arrays_digest(state)
    if digest != meta.get('arrays_sha256'):
      problem = (f'{path}: the arrays changed after conversion (digest {digest}, recorded '
                 f'{meta.get("arrays_sha256")})')
  if problem and not allow_unverified:
    raise WeightsHashMismatch(problem)
  params = convert_inception(state)
  return params, {'path': path, 'sha256': meta.get('source_sha256'), 'verified': problem is None,
                  'problem': problem}
