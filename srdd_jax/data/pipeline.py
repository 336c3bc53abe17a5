"""Input pipelines: `build_source(config.data, image_size, train=...)` -> an `ImageSource`.

    source = build_source(config.data, image_size=256)
    rows = rows_for_process(global_batch, jax.process_index(), jax.process_count())
    for images, labels in source.iterator(config.seed, start_step, global_batch, rows):
      ...  # images float32 (n, S, S, 3) in [-1, 1], labels int32 (n,): this process's rows of the step
    # raw=True: images as decoded (uint8), normalised on the devices by preprocess.to_model_range.

The batch of step s is a pure function of (seed, s) (see source.py): a resumed run sees the batches it
would have seen, and processes taking disjoint rows see together exactly the batch of one process.

config.data keys (every default is in srdd_jax/config.py; None means "depends on `train`" or "required"):
  source         'synthetic' | 'tfds' | 'folder' | 'fashion_mnist' | 'digits'.
  split          'train' when train else 'test'. tfds: any TFDS split string ('train[:90%]', 'validation');
                 fashion_mnist: 'train' (60000) | 'test' (10000); digits: 'train' (first 1500) | 'test'
                 (last 297) | 'all'. Not used by 'folder' (point `path` at the split) or 'synthetic'.
  resize_ratio   1.125: the shorter side is resized (Lanczos) to round(resize_ratio * image_size) before
                 the crop, as in VAR.
  random_crop    True when train: a random image_size crop; otherwise the centre crop.
  flip           True when train: a random horizontal flip with probability 1/2.
  name           tfds: the dataset name, with an optional config and version ('sun397/tfds:4.*').
  data_dir       tfds (and the fashion_mnist fallback): TFDS's data_dir; None is TFDS's default
                 (~/tensorflow_datasets or $TFDS_DATA_DIR).
  download       False: a TFDS dataset not prepared under data_dir fails at once; True downloads and
                 prepares it (as array_record), which needs a network.
  image_key      tfds: the image feature, 'image'.
  label_key      tfds: the class-label feature, 'label'; a dataset without it has labels 0 and 1 class.
  workers        threads that read and decode examples (each batch split over all of them), 0:
                 two per CPU core the process may use (at most 64).
  path           folder: the root folder.
  labels         folder: 'subfolder' (one class per top-level sub-folder, ids in sorted name order) or
                 'none' (flat and unlabelled: every label 0, 1 class). Files are found recursively.
  idx_dir        fashion_mnist: the folder of Debian's IDX files, '/usr/share/datasets/fashion-mnist'.
                 When it does not exist the source is TFDS 'fashion_mnist' under data_dir instead.
  num_examples   synthetic: the size of the set, 1024.
  num_classes    synthetic: the number of classes, 10.
Synthetic images are generated at image_size; resize, crop and flip do not apply to them.
"""
from __future__ import annotations

import socket

from absl import logging

from srdd_jax import files
from srdd_jax.config import DEFAULTS as DEFAULTS_ALL
from srdd_jax.data import digits, idx, tfds_source
from srdd_jax.data.arrays import ArraySource
from srdd_jax.data.folder import FolderSource
from srdd_jax.data.source import DataError, ImageSource
from srdd_jax.data.synthetic import SyntheticImages

__all__ = ['DEFAULTS', 'SOURCES', 'DataError', 'ImageSource', 'build_source', 'check', 'rows_for_process']

SOURCES = ('synthetic', 'tfds', 'folder', 'fashion_mnist', 'digits')
# The keys this module reads, with their defaults (the one table of them is srdd_jax/config.py).
DEFAULTS = {k: v for k, v in DEFAULTS_ALL['data'].items() if k != 'token_cache'}
DEFAULTS['num_classes'] = 10  # What None means outside training (training: the model's class count).
# Where TFDS's fashion_mnist downloads from: probed first so that an offline machine fails in seconds.
_FASHION_MNIST_HOST = ('fashion-mnist.s3-website.eu-central-1.amazonaws.com', 80)
_APT_HINT = ('; offline, `apt-get install dataset-fashion-mnist` installs the IDX files that '
             'config.data.idx_dir points to')


class SyntheticSource(ImageSource):
  """SyntheticImages in the common interface; the same images and order as SyntheticImages.batch."""

  def __init__(self, num_examples: int, num_classes: int, image_size: int):
    if num_examples < 1 or num_classes < 1:
      raise DataError(f'config.data.num_examples={num_examples} and config.data.num_classes={num_classes} '
                      'must be >= 1 for the synthetic source')
    self.images = SyntheticImages(num_examples, num_classes, image_size)
    super().__init__(num_examples=num_examples, num_classes=num_classes, image_size=image_size,
                     description=f'synthetic ({num_examples} images, {num_classes} classes, {image_size}px)')

  def load(self, index: int):
    return self.images.image(index), self.images.label(index)

  def decode(self, index: int, seed: int, step: int, position: int):
    return self.load(index)

  def batch(self, seed: int, step: int, global_batch: int, rows=None, raw: bool = False):
    # Synthetic images are float32 in [-1, 1] already: raw or not, they are what the devices get.
    del raw
    return super().batch(seed, step, global_batch, rows)

  def iterator(self, seed: int, start_step: int, global_batch: int, rows=None, raw: bool = False):
    # Images computed from their index need no decoding threads.
    step = start_step
    while True:
      yield self.batch(seed, step, global_batch, rows, raw)
      step += 1


def _options(data_config, train: bool) -> dict:
  get = data_config.get
  unknown = sorted(set(data_config.keys()) - set(DEFAULTS) - {'token_cache'})
  if unknown:
    raise DataError(f'config.data.{unknown[0]} is not a key of config.data; known: {sorted(DEFAULTS)}')
  o = {k: v if get(k) is None else get(k) for k, v in DEFAULTS.items()}
  o['split'] = o['split'] or ('train' if train else 'test')
  o['random_crop'] = train if o['random_crop'] is None else bool(o['random_crop'])
  o['flip'] = train if o['flip'] is None else bool(o['flip'])
  if o['source'] not in SOURCES:
    raise DataError(f'config.data.source={o["source"]!r} must be one of {SOURCES}')
  if not (isinstance(o['workers'], int) and o['workers'] >= 0):
    raise DataError(f'config.data.workers={o["workers"]!r} must be an integer >= 0 (0: two threads per core)')
  if not float(o['resize_ratio']) >= 1.0:
    raise DataError(f'config.data.resize_ratio={o["resize_ratio"]} must be >= 1 (the crop is taken from '
                    'the resized image)')
  return o


def check(data_config) -> None:
  """config.data's keys and values, without reading any data (`--dry_run`)."""
  _options({k: v for k, v in data_config.items() if k != 'token_cache'}, train=True)


def _network_reachable(address: tuple[str, int], timeout: float = 3.0) -> bool:
  try:
    with socket.create_connection(address, timeout=timeout):
      return True
  except OSError:
    return False


def _fashion_mnist(o: dict, preprocessing: dict) -> ImageSource:
  idx_dir = o['idx_dir']
  if idx_dir and files.isdir(idx_dir):
    images, labels = idx.load_fashion_mnist(idx_dir, o['split'])
    return ArraySource(images, labels, len(idx.CLASSES), name_prefix=f'fashion_mnist/{o["split"]}',
                       description=f'Fashion-MNIST {o["split"]} from IDX files in {idx_dir} ({len(images)} '
                                   'images, 10 classes)', **preprocessing)
  logging.info('config.data.idx_dir=%r does not exist: using TFDS fashion_mnist', idx_dir)
  hint = f' (config.data.idx_dir={idx_dir!r} does not exist either){_APT_HINT}'
  download = bool(o['download'])
  if download and not tfds_source.is_prepared('fashion_mnist', o['data_dir']) and \
      not _network_reachable(_FASHION_MNIST_HOST):
    raise DataError(f'config.data.download=True but {_FASHION_MNIST_HOST[0]} cannot be reached to download '
                    f'TFDS fashion_mnist into config.data.data_dir={o["data_dir"]!r}{hint}')
  return tfds_source.build_tfds('fashion_mnist', o['split'], o['data_dir'], download, hint=hint, **preprocessing)


def build_source(data_config, image_size: int, *, train: bool = True) -> ImageSource:
  """The ImageSource that config.data describes; DataError (naming the key and path) when it cannot work,
  including a data set without one readable example (found here, before any training starts)."""
  source = _build(data_config, image_size, train)
  source.example(0, 0, 0, 1)  # One decode: the first readable example of the seed-0 order.
  return source


def _build(data_config, image_size: int, train: bool) -> ImageSource:
  o = _options(data_config, train)
  image_size = int(image_size)
  if image_size < 1:
    raise DataError(f'image_size must be >= 1, got {image_size}')
  src = o['source']
  if src == 'synthetic':
    return SyntheticSource(int(o['num_examples']), int(o['num_classes']), image_size)
  preprocessing = {'image_size': image_size, 'resize_ratio': float(o['resize_ratio']),
                   'random_crop': o['random_crop'], 'flip': o['flip'], 'workers': int(o['workers'])}
  if src == 'folder':
    return FolderSource(o['path'], o['labels'], **preprocessing)
  if src == 'digits':
    images, labels = digits.load_digits(o['split'])
    return ArraySource(images, labels, 10, name_prefix=f'digits/{o["split"]}',
                       description=f'sklearn digits {o["split"]} ({len(images)} images 8x8, 10 classes)',
                       **preprocessing)
  if src == 'fashion_mnist':
    return _fashion_mnist(o, preprocessing)
  return tfds_source.build_tfds(o['name'], o['split'], o['data_dir'], bool(o['download']),
                                image_key=o['image_key'], label_key=o['label_key'], **preprocessing)


def rows_for_process(global_batch: int, process_index: int, process_count: int) -> slice:
  """The rows of the global batch that process `process_index` of `process_count` loads."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f'process {process_index} of {process_count} does not exist')
  if global_batch % process_count:
    raise DataError(f'the global batch {global_batch} does not split evenly over {process_count} processes')
  n = global_batch // process_count
  return slice(process_index * n, (process_index + 1) * n)
