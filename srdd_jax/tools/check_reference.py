"""Compare the port against reference vectors of the official PyTorch code.

  python -m srdd_jax.tools.check_reference FILE.npz [FILE.npz ...] [--strict]

Reads each file's `meta`, runs the port on the file's inputs with the file's weights, compares every
output it holds against the tolerances of the reference README and prints one line per quantity.
Exits 1 if a check fails (or, with --strict, if an entry could not be checked), 2 on unreadable input or
a bad flag (an `error:` line on stderr for each).
"""
from __future__ import annotations

import sys
import zipfile
from argparse import RawDescriptionHelpFormatter

import jax

from srdd_jax import files
from srdd_jax.config import ArgumentParser
from srdd_jax.tools import reference_common as rc
from srdd_jax.tools.reference_fid import check_fid_inception
from srdd_jax.tools.reference_var import check_var
from srdd_jax.tools.reference_vqvae import check_vqvae


def _checkers():
  return {'vqvae': check_vqvae, 'var': check_var, 'fid_inception': check_fid_inception}


def check_file(path: str) -> tuple[dict, list[rc.Result]]:
  """Runs every check the port supports on one reference file."""
  if not files.isfile(path):
    raise rc.ReferenceFormatError(f'{path}: no such file')
  try:
    z = files.np_load(path, allow_pickle=False)
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise rc.ReferenceFormatError(f'{path}: not a readable .npz file ({e})') from e
  with z:
    meta = rc.read_meta(z, path)
    checker = _checkers().get(meta['kind'])
    if checker is None:
      prefixes = ('vae/', 'var/', 'inception/')
      weights = [k for k in z.files if k.startswith(prefixes)]
      results = [rc.Result(k, rc.NOT_CHECKED, f"kind '{meta['kind']}' is not supported yet")
                 for k in z.files if k != 'meta' and k not in weights]
      if weights:
        results.insert(0, rc.Result(f'{len(weights)} weight entries', rc.NOT_CHECKED,
                                    f"kind '{meta['kind']}' is not supported yet"))
      return meta, results
    return meta, checker(z, meta, path)


def _describe(meta: dict) -> str:
  keys = ('kind', 'batch', 'image_size', 'ch', 'V', 'Cvae', 'depth', 'width', 'patch_nums', 'seed')
  return '  '.join(f'{k}={meta[k]}' for k in keys if k in meta)


def main(argv=None) -> int:
  parser = ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=RawDescriptionHelpFormatter)
  parser.add_argument('files', nargs='+', help='reference .npz files')
  parser.add_argument('--strict', action='store_true',
                      help='also fail when an entry of a file cannot be checked yet')
  args = parser.parse_args(argv)

  # The tolerances of the reference README assume true float32 matmuls.
  jax.config.update('jax_default_matmul_precision', 'highest')

  totals = {rc.PASS: 0, rc.FAIL: 0, rc.NOT_CHECKED: 0, rc.INFO: 0}
  unreadable = 0
  for path in args.files:
    try:
      meta, results = check_file(path)
    except rc.ReferenceFormatError as e:  # One line per file, on stderr as every tool's bad input is.
      print(f'error: {e}', file=sys.stderr, flush=True)
      unreadable += 1
      continue
    print(f'== {path}: {_describe(meta)}', flush=True)
    width = max((len(r.name) for r in results), default=0)
    for r in results:
      totals[r.status] += 1
      print(f'{r.status:<12} {r.name:<{width}}  {r.detail}', flush=True)
  print(f'{totals[rc.PASS]} passed, {totals[rc.FAIL]} failed, {totals[rc.NOT_CHECKED]} not checked'
        + (f', {unreadable} file(s) unreadable' if unreadable else ''))
  if unreadable:
    return 2
  if totals[rc.FAIL] or (args.strict and totals[rc.NOT_CHECKED]):
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
