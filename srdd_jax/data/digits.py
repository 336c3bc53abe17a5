"""scikit-learn's bundled 8x8 digits (1797 images, 10 classes): a real dataset for tiny tests, no files."""
from __future__ import annotations

import numpy as np

from srdd_jax.data.source import DataError

# sklearn's digits come unsplit; a fixed cut keeps 'test' disjoint from 'train'.
SPLITS = {'train': slice(0, 1500), 'test': slice(1500, None), 'all': slice(None)}


def load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (N, 8, 8) scaled from 0..16 to 0..255, labels (N,))."""
  if split not in SPLITS:
    raise DataError(f'config.data.split={split!r}: the digits source has the splits {tuple(SPLITS)}')
  try:
    from sklearn import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise DataError("config.data.source='digits' needs scikit-learn: pip install scikit-learn") from e
  d = datasets.load_digits()
  images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
  return images[SPLITS[split]], d.target[SPLITS[split]].astype(np.int64)
