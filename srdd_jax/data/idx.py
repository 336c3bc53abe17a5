"""Fashion-MNIST from IDX files (Debian's `dataset-fashion-mnist`: /usr/share/datasets/fashion-mnist)."""
from __future__ import annotations

import gzip

import numpy as np

from srdd_jax import files
from srdd_jax.data.source import DataError

DEFAULT_DIR = '/usr/share/datasets/fashion-mnist'
SPLIT_PREFIX = {'train': 'train', 'test': 't10k'}
CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
           'Ankle boot')
# IDX magic numbers: two zero bytes, the element type (0x08 = uint8), then the number of dimensions.
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801


def read_idx(path: str, magic: int) -> np.ndarray:
  """The uint8 array of a (gzipped) IDX file; DataError naming the file when it is not one."""
  try:
    raw = files.read_bytes(path)
    if path.endswith('.gz'):
      raw = gzip.decompress(raw)
  except (OSError, EOFError) as e:
    raise DataError(f'cannot read IDX file {path}: {e}') from e
  if len(raw) < 4 or int.from_bytes(raw[:4], 'big') != magic:
    raise DataError(f'{path} is not an IDX file of {magic & 0xff} dimension(s) of uint8')
  ndim = magic & 0xff
  header = 4 + 4 * ndim
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  if len(raw) != header + int(np.prod(shape)):
    raise DataError(f'{path}: {len(raw) - header} bytes of data for a shape {shape} (truncated?)')
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def idx_files(idx_dir: str, split: str) -> tuple[str, str]:
  if split not in SPLIT_PREFIX:
    raise DataError(f'config.data.split={split!r}: Fashion-MNIST has the splits {tuple(SPLIT_PREFIX)}')
  p = SPLIT_PREFIX[split]
  return (files.join(idx_dir, f'{p}-images-idx3-ubyte.gz'), files.join(idx_dir, f'{p}-labels-idx1-ubyte.gz'))


def load_fashion_mnist(idx_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (N, 28, 28), labels (N,)) of a split read from idx_dir."""
  images_path, labels_path = idx_files(idx_dir, split)
  for path in (images_path, labels_path):
    if not files.isfile(path):
      raise DataError(f'config.data.idx_dir={idx_dir!r} has no {files.basename(path)} ({path}); '
                      '`apt-get install dataset-fashion-mnist` installs the IDX files')
  images, labels = read_idx(images_path, _IMAGES_MAGIC), read_idx(labels_path, _LABELS_MAGIC)
  if len(images) != len(labels) or labels.max(initial=0) >= len(CLASSES):
    raise DataError(f'{images_path} and {labels_path} do not match: {len(images)} images, {len(labels)} '
                    f'labels, largest label {labels.max(initial=0)}')
  return images, labels
