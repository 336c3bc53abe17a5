"""Convert pytorch-fid's FID Inception weights to an .npz that srdd_jax reads without torch.

  python -m srdd_jax.tools.convert_inception --pth pt_inception-2015-12-05-6726825d.pth --out fid_inception_weights.npz

The file is the one a user downloaded from pytorch-fid's release
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth);
nothing is downloaded here. Its SHA-256 must be the published one, every key and shape is checked
against the Flax network, and the output records the source hash and a digest of its arrays, which
`srdd_jax.evaluation.inception_weights.load_inception` checks again on every load. Reading the .pth needs
torch once (`pip install torch`); the .npz does not.
"""
from __future__ import annotations

import argparse
import sys
import time

from srdd_jax import files
from srdd_jax.evaluation import inception_weights as fid_inception


def out_problem(out: str, overwrite: bool) -> str | None:
  """Why the .npz `out` (--out) cannot be written, or None; asked before the input is read (hashing
  and loading the .pth take seconds, and the conversion found the folder missing only at its end)."""
  if not out.endswith('.npz'):
    return f'--out={out!r}: the output is an .npz; name the file with that extension'
  if files.isdir(out):
    return f'--out={out!r} is a folder; name the .npz file to write'
  if files.exists(out) and not overwrite:
    return f'--out={out!r} exists; pass --overwrite to replace it'
  folder = files.dirname(out)
  if folder and not files.is_remote(out) and not files.isdir(folder):
    return f'--out={out!r}: {folder!r} is not a folder' if files.exists(folder) else \
        f'--out={out!r}: the folder {folder!r} does not exist'
  return None


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  ap.add_argument('--pth', required=True, help=f"pytorch-fid's {fid_inception.FID_WEIGHTS_FILE}")
  ap.add_argument('--out', required=True, help='output .npz')
  ap.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  args = ap.parse_args(argv)
  problem = out_problem(args.out, args.overwrite)
  if not problem and not files.isfile(args.pth):
    # An empty path is the working directory to epath: named as missing, not as a folder.
    problem = f'--pth={args.pth!r}: ' + ('a folder, not the .pth file' if args.pth and files.isdir(args.pth)
                                        else 'no such file')
  if problem:
    print(f'error: {problem}', file=sys.stderr)
    return 2

  t0 = time.time()
  try:
    sha, state = fid_inception.read_pth(args.pth)
    print(f'{args.pth}: SHA-256 {sha} (the published file); keys and shapes match', flush=True)
    out = fid_inception.save_npz(args.out, state, source_sha256=sha, source=args.pth,
                                 overwrite=args.overwrite)
  except (OSError, ImportError, ValueError) as e:
    # WeightsHashMismatch and StateDictMismatch are ValueErrors with the full explanation; OSError is a
    # file that vanished or cannot be read or written since the checks above.
    print(f'error: {e}', file=sys.stderr)
    return 2
  n = len([k for k in state if not k.endswith('num_batches_tracked')])
  print(f'checked and wrote {n} weight arrays to {out} in {time.time() - t0:.1f}s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
