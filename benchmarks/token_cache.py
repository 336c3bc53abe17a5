"""Tokenize throughput, and train-step time with and without a token cache.

  python -m benchmarks.token_cache --tokenizer DIR/tokenizer/params [--config configs/fashion_mnist.py]

Tokenizes `--examples` images of the config's data set with the given tokenizer (images/s), then trains
`--steps` steps twice from the same initial state: encoding the images inside the step, and reading the
token cache. Reports the median step time of each (the first steps, which compile, are excluded).
Record: docs/PERFORMANCE.md, the token-cache paragraph, measured at commit 7e06c71.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from srdd_jax.config import load_file
from srdd_jax.data import pipeline
from srdd_jax.modes import tokenize, train


def _step_times(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    recs = [json.loads(line) for line in f]
  return [1.0 / r['steps_per_s'] for r in recs[2:]]  # log_every=1: one record per step.


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--config', default='configs/fashion_mnist.py')
  p.add_argument('--tokenizer', required=True, help='a trained tokenizer (DIR/tokenizer/params)')
  p.add_argument('--examples', type=int, default=4096)
  p.add_argument('--steps', type=int, default=30)
  a = p.parse_args(argv)
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    c = load_file(a.config)
    c.tokenizer.checkpoint = a.tokenizer
    c.tokenize.out_dir = os.path.join(tmp, 'tokens')
    c.tokenize.shard_size = a.examples
    # A subset of the data: the first `examples` images, by index (the cache's order).
    c.data.split = f'train[:{a.examples}]' if c.data.source == 'tfds' else c.data.split
    real_build = pipeline.build_source

    def subset(*args, **kw):
      s = real_build(*args, **kw)
      s.num_examples = min(s.num_examples, a.examples)
      return s

    pipeline.build_source = subset
    t0 = time.time()
    r = tokenize.run(c, tmp)
    out['tokenize_images_per_s'] = r['images_per_s']
    out['tokenize_wall_s'] = round(time.time() - t0, 1)
    for name, cache in (('images', ''), ('cache', c.tokenize.out_dir)):
      c2 = load_file(a.config)
      c2.tokenizer.checkpoint = a.tokenizer
      c2.data.token_cache = cache
      c2.train.update(steps=a.steps, log_every=1, checkpoint_every=10 ** 6, sample_every=0)
      wd = os.path.join(tmp, f'train_{name}')
      train.run(c2, wd)
      times = _step_times(wd)
      out[f'step_s_from_{name}'] = round(statistics.median(times), 4)
    pipeline.build_source = real_build
  out['speedup'] = round(out['step_s_from_images'] / out['step_s_from_cache'], 2)
  print(json.dumps(out, indent=1))
  return out


if __name__ == '__main__':
  main()
