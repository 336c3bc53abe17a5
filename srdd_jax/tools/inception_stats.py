"""Reference statistics (mean and covariance of pool3 features) of a set of images.

  python -m srdd_jax.tools.inception_stats --weights fid_inception_weights.npz --images DIR_OR_NPZ --out stats.npz

--weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` or its conversion by
`python -m srdd_jax.tools.convert_inception`; the published SHA-256 is required, so statistics are
never computed with other weights. --images: a folder of PNG/JPEG files (all of one size, read as
RGB, as pytorch-fid does) or an `.npz` whose `arr_0` holds uint8 NHWC images (OpenAI's reference
batches, the sampler's npz). The output (`mu`, `sigma`, `meta`) is read by
`srdd_jax.evaluation.stats.load_reference_batch`.
"""
from __future__ import annotations

import argparse
import re
import sys
import time

import numpy as np

from srdd_jax import files
from srdd_jax.data import preprocess
from srdd_jax.data.folder import EXTENSIONS
from srdd_jax.evaluation import inception_weights as fid_inception
from srdd_jax.evaluation import stats
from srdd_jax.tools.convert_inception import out_problem

_IMAGE_EXTENSIONS = EXTENSIONS  # Those the training folders read, TIFF included.


def image_files(folder: str) -> list[str]:
  found = sorted(files.join(folder, f) for f in files.listdir(folder)
                 if f.lower().endswith(_IMAGE_EXTENSIONS))
  if not found:
    raise ValueError(f'{folder}: no image files ({", ".join(_IMAGE_EXTENSIONS)})')
  return found


def folder_chunks(paths: list[str], chunk: int):
  """uint8 NHWC arrays of up to `chunk` images; every image must have the first one's size."""
  size = None
  for start in range(0, len(paths), chunk):
    arrays = []
    for f in paths[start:start + chunk]:
      try:
        with files.load_image(f) as im:
          a = np.asarray(preprocess.to_rgb(im), np.uint8)  # Float and 16/32-bit images from their range.
      # PIL's errors for broken bytes (OSError, SyntaxError, DecompressionBombError, ...) do not all name
      # the file; statistics of the rest would be of another set than the one asked for.
      except Exception as e:  # pylint: disable=broad-except
        # PIL names the file object it read (an address): left out, the line is the same each run.
        why = re.sub(r' <[^>]*>', '', str(e))
        raise ValueError(f'{f}: unreadable image ({type(e).__name__}: {why}); remove or replace it') from None
      if size is None:
        size = a.shape
      elif a.shape != size:
        raise ValueError(f'{f}: size {a.shape[1]}x{a.shape[0]}, but {paths[0]} is {size[1]}x{size[0]}; '
                         'resize the images to one size first')
      arrays.append(a)
    yield np.stack(arrays)


def _images_npz(path: str) -> np.ndarray:
  """`arr_0` of the .npz --images names; ValueError naming the file when it is not one (numpy raises
  BadZipFile, EOFError, pickle errors, ... for bytes that are not an .npz)."""
  try:
    return stats.load_reference_batch(path, images=True).images
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, ValueError) and str(e).startswith(path):  # The file's entries, named already.
      raise
    raise ValueError(f'--images={path!r} is neither a folder of images nor a readable .npz '
                     f'({type(e).__name__}: {e})') from None


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  ap.add_argument('--weights', required=True, help='published .pth or its converted .npz')
  ap.add_argument('--images', required=True, help='folder of images, or .npz with arr_0')
  ap.add_argument('--out', required=True, help='output .npz (mu, sigma, meta)')
  ap.add_argument('--batch_size', type=int, default=64)
  ap.add_argument('--overwrite', action='store_true')
  args = ap.parse_args(argv)

  # Everything the arguments alone can show is checked before the weights load and the features are
  # computed (minutes for a large set): the output, the batch, that the inputs exist.
  problem = out_problem(args.out, args.overwrite)
  if not problem and args.batch_size < 1:
    problem = f'--batch_size={args.batch_size}: must be >= 1'
  for flag, path in (('--weights', args.weights), ('--images', args.images)):
    if not problem and not (path and files.exists(path)):  # '' would be the working directory.
      problem = f'{flag}={path!r}: no such file' + (' or folder' if flag == '--images' else '')
  if not problem and files.isdir(args.weights):
    problem = f'--weights={args.weights!r}: a folder, not the weights file'
  if problem:
    print(f'error: {problem}', file=sys.stderr)
    return 2
  t0 = time.time()
  try:
    # The weights first: a set of images (10 GB for ImageNet's reference batch) is not read for nothing.
    params, info = fid_inception.load_inception(args.weights)
    chunk = 50 * args.batch_size
    if files.isdir(args.images):
      paths = image_files(args.images)
      batches, n = folder_chunks(paths, chunk), len(paths)
    else:
      images = _images_npz(args.images)
      batches = (images[i:i + chunk] for i in range(0, len(images), chunk))
      n = len(images)
    print(f'{n} images from {args.images}; weights {args.weights} (SHA-256 {info["sha256"]})', flush=True)
    mu, sigma, count = stats.statistics_from_images(params, batches, batch_size=args.batch_size)
    stats.save_statistics(args.out, mu, sigma, count=count, weights_sha256=info['sha256'],
                          source=files.absolute(args.images), overwrite=args.overwrite)
  except (OSError, ImportError, ValueError) as e:
    # WeightsHashMismatch is a ValueError that names the file and both digests.
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote mu {mu.shape} and sigma {sigma.shape} of {count} images to {args.out} '
        f'in {time.time() - t0:.1f}s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
