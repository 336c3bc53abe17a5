"""What real images score on the demo's proxy metrics: 100 training-split images per class, scored as
if they were samples against the test split (fd_cnn_fashion_mnist_32px and class consistency), a few
random draws. The floor of the demo's eval at its sample count, and the consistency of real data.

  python -m benchmarks.real_floor --workdir DIR [--draws 3] [--per_class 100]

DIR: a workdir whose proxy_classifier/ the demo's eval trained (else one is trained there).
Record: docs/RESULTS.md (issue 35).
"""
import argparse
import importlib.util
import json
import os

import numpy as np

from srdd_jax.config import with_defaults
from srdd_jax.evaluation import classifier, protocol

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--draws', type=int, default=3)
  p.add_argument('--per_class', type=int, default=100)
  a = p.parse_args(argv)
  spec = importlib.util.spec_from_file_location('fashion_mnist', os.path.join(REPO, 'configs', 'fashion_mnist.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = with_defaults(module.get_config())
  scorer = protocol.ProxyScorer(c, c.eval.to_dict(), a.workdir, seed=0)
  images, labels, classes = classifier.load_split(c.data, 32, 'train')
  rng = np.random.default_rng(0)
  rows = []
  for draw in range(a.draws):
    pick = np.concatenate([rng.choice(np.where(labels == k)[0], a.per_class, replace=False) for k in range(classes)])
    m = scorer(images[pick], labels[pick], 'test')
    rows.append({'draw': draw, **{k: v for k, v in m.items() if k.startswith('fd_') or k == 'class_consistency'},
                 'n': int(len(pick))})
    print(json.dumps(rows[-1]), flush=True)
  return rows


if __name__ == '__main__':
  main()
