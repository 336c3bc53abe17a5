"""Train (or find cached) the proxy classifier of a dataset and print its test accuracy.

  python -m srdd_jax.tools.train_proxy_classifier --data=fashion_mnist --image_size=32 \\
      --resize_ratio=1.0 --out=workdir/demo/proxy_classifier

Other config.data keys go through --set KEY=VALUE (repeatable; values are parsed as JSON when they
parse, e.g. --set flip=false, else kept as strings: --set name=cifar10). The classifier lands in
OUT/<key>/ (see srdd_jax/evaluation/classifier.py); a second run with the same arguments reads it back
instead of training. Its features give the proxy metric `fd_<name>` (a Fréchet distance in this
classifier's feature space, not an FID).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from srdd_jax import files
from srdd_jax.data import pipeline
from srdd_jax.data.source import DataError
from srdd_jax.evaluation import classifier, proxy
from srdd_jax.parallel.workdir import WorkdirLock


def _parse_set(items: list[str]) -> dict:
  out = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or not key:
      raise ValueError(f'--set expects KEY=VALUE, got {item!r}')
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def _problem(args) -> str | None:
  """Why the flags cannot give a classifier, or None: found here, before the data is read and a
  classifier trained (minutes), not by the cache's write at the end."""
  for flag, least in (('image_size', 1), ('epochs', 1), ('batch_size', 1), ('seed', 0)):
    if getattr(args, flag) < least:
      return f'--{flag}={getattr(args, flag)}: must be >= {least}'
  if args.max_train_examples is not None and args.max_train_examples < 1:
    return f'--max_train_examples={args.max_train_examples}: must be >= 1 (leave it out for all of them)'
  if args.resize_ratio is not None and not args.resize_ratio >= 1:  # NaN too.
    return f'--resize_ratio={args.resize_ratio}: must be >= 1 (the crop is taken from the resized image)'
  if files.is_remote(args.out):
    return None
  folder = args.out.rstrip('/') or '/'
  while not files.exists(folder) and files.dirname(folder) not in ('', folder):
    folder = files.dirname(folder)  # The nearest part of --out that exists must be a folder.
  if files.exists(folder) and not files.isdir(folder):
    return f'--out={args.out!r}: {folder!r} is a file, not a folder'
  return None


def _check_data(data: dict) -> None:
  """config.data's keys and values (--data, --set), before any data is read; a value of the wrong type
  (--set resize_ratio=[1]) fails in float() or int() without the key, so the flags are named here."""
  if 'split' in data:  # classifier.load_split replaces it with its own two, so it was dropped without a word.
    raise ValueError(f'--set split={data["split"]!r}: the proxy classifier reads its own splits (trained on the '
                     f'source\'s train split, measured on its test split; a folder holds out its last '
                     f'{classifier.HOLDOUT_FRACTION:.0%}); leave split out')
  if 'random_crop' in data:  # The classifier reads centre crops whatever it says (classifier.py): refused.
    raise ValueError(f'--set random_crop={data["random_crop"]!r}: the proxy classifier reads centre crops (random '
                     'crops would not change it); leave random_crop out')
  try:
    pipeline.check(data)
  except DataError:
    raise
  except (TypeError, ValueError) as e:
    raise ValueError(f'--set {" ".join(f"{k}={v!r}" for k, v in data.items() if k != "source")}: a value of '
                     f'the wrong type for config.data ({type(e).__name__}: {e})') from None


def _train_or_load_holding(args, data):
  """classifier.train_or_load holding --out (a second command on the same cache says who has it instead
  of training too); a folder this call created is removed again when it fails with nothing in it."""
  created = not files.exists(args.out)
  files.makedirs(args.out)
  try:
    with WorkdirLock(args.out):
      return classifier.train_or_load(data, args.image_size, args.out, seed=args.seed, epochs=args.epochs,
                                      batch_size=args.batch_size, max_train_examples=args.max_train_examples)
  except BaseException:
    if created and files.isdir(args.out) and not files.listdir(args.out):
      files.rmtree(args.out)
    raise


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  ap.add_argument('--data', required=True, help='config.data.source: fashion_mnist, digits, tfds, folder, ...')
  ap.add_argument('--image_size', type=int, required=True, help="the generator's resolution")
  ap.add_argument('--out', required=True, help='cache directory (e.g. WORKDIR/proxy_classifier)')
  ap.add_argument('--resize_ratio', type=float, default=None,
                  help='config.data.resize_ratio (default: the pipeline default)')
  ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='another config.data key')
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--epochs', type=int, default=4)
  ap.add_argument('--batch_size', type=int, default=64)
  ap.add_argument('--max_train_examples', type=int, default=None)
  args = ap.parse_args(argv)

  problem = _problem(args)
  if problem:
    print(f'error: {problem}', file=sys.stderr)
    return 2
  t0 = time.time()
  try:
    data = {'source': args.data, **_parse_set(args.set)}
    if args.resize_ratio is not None:
      data['resize_ratio'] = args.resize_ratio
    _check_data(data)
    clf = _train_or_load_holding(args, data)
  except (DataError, ValueError, OSError) as e:
    # DataError names the config.data key (--set KEY=VALUE sets config.data.KEY) and the path.
    print(f'error: {e}', file=sys.stderr)
    return 2
  info = clf.info
  how = ('read from the cache' if clf.from_cache else
         f'trained: data {info["data_seconds"]:.1f}s, training and test {info["train_seconds"]:.1f}s')
  print(f'proxy classifier {clf.key} ({how})')
  print(f'test accuracy {clf.accuracy:.4f} ({info["test_correct"]}/{info["num_test_examples"]} test images; '
        f'{info["num_train_examples"]} training images, {info["epochs"]} epochs)')
  print(f'metric name: {proxy.fd_name(clf)}; cache: {args.out}/{clf.key}; wall time {time.time() - t0:.1f}s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
