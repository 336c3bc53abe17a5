"""The proxy Fréchet distance a tokenizer alone costs: real images against their reconstructions.

  python -m benchmarks.tokenizer_fd_floor --tokenizer DIR/tokenizer/params [--sizes 1000,10000]

On the embedded default's data (configs/fashion_mnist.py): the first N training images, as they are and
passed through the tokenizer (image -> tokens -> image), each scored against the test split with the
project's proxy classifier (`fd_cnn_fashion_mnist_32px`, not an FID; trained or loaded from --cache).
The first number is the floor of the metric at that sample size, the second what a perfect transformer
over this tokenizer would score: a generator's fd can approach it, not go below it.
Record: docs/TOKENIZER.md, the tokenizer's fd floor table, measured at commit ae896b1.
"""
from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from srdd_jax.convert.params_io import load_vqvae
from srdd_jax.evaluation import classifier, proxy
from srdd_jax.tokenizer.api import Tokenizer


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--tokenizer', required=True)
  p.add_argument('--sizes', default='1000,10000')
  p.add_argument('--cache', default='/tmp/proxy_clf', help='proxy classifier cache directory')
  a = p.parse_args(argv)
  from configs import fashion_mnist  # pylint: disable=import-outside-toplevel
  c = fashion_mnist.get_config()
  vq, params = load_vqvae(a.tokenizer)
  clf = classifier.train_or_load(c.data, vq.image_size, a.cache, seed=0)
  test, _, _ = classifier.load_split(c.data, vq.image_size, 'test')
  train, labels, _ = classifier.load_split(c.data, vq.image_size, 'train')
  real_stats = proxy.feature_statistics(clf, test, what='test')
  rec = jax.jit(Tokenizer(vq).reconstruct)
  out = []
  for n in (int(s) for s in a.sizes.split(',')):
    x = train[:n]
    parts = []
    for i in range(0, n, 500):
      y = np.asarray(rec(params, x[i:i + 500].astype(np.float32) / 127.5 - 1))
      parts.append(np.clip(np.round((y + 1) * 127.5), 0, 255).astype(np.uint8))
    for what, images in (('real', x), ('reconstructed', np.concatenate(parts))):
      m = proxy.proxy_metrics(clf, None, images, labels[:n], real_stats=real_stats)
      out.append({'n': n, 'images': what, **m})
      print(json.dumps(out[-1]), flush=True)
  return out


if __name__ == '__main__':
  main()
