"""TFDS datasets by name, split and data_dir, read by random access.

A dataset prepared as array_record (or parquet) is read with `builder.as_data_source`: any example by
index, nothing held in memory. A dataset prepared only as tfrecord has no random access; its split is read
whole into memory as encoded bytes when it is smaller than `max_in_memory_mb`, and otherwise refused with
the command that converts it (`tfds convert_format ... --out_file_format=array_record`).

Nothing is downloaded unless `download=True`: a dataset not prepared under data_dir fails at once instead of
reaching for the network, which on an offline machine could hang.
"""
from __future__ import annotations

import threading

import numpy as np
from absl import logging

from srdd_jax.data.arrays import ArraySource, decode_image
from srdd_jax.data.source import DataError, ImageSource

RANDOM_ACCESS_FORMATS = ('array_record', 'parquet')


def _tfds():
  # Deferred: importing TFDS pulls in TensorFlow lazily, but only TFDS sources need either.
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tfds


class TfdsSource(ImageSource):
  """Random access to a prepared array_record/parquet split."""

  def __init__(self, data_source, label_key: str | None, image_key: str, tag: str, **kwargs):
    self._ds, self._image_key, self._label_key, self._tag = data_source, image_key, label_key, tag
    self._read_lock = threading.Lock()
    super().__init__(num_examples=len(data_source), **kwargs)

  def name(self, index: int) -> str:
    return f'{self._tag}[{index}]'

  def load(self, index: int):
    # Only the read and parse are serialised; the decode below runs on the caller's thread in parallel.
    with self._read_lock:
      example = self._ds[index]
    label = int(example[self._label_key]) if self._label_key else 0
    return decode_image(example[self._image_key], self.name(index)), label


def is_prepared(name: str, data_dir: str | None) -> bool:
  try:
    return _tfds().builder(name, data_dir=data_dir).is_prepared()
  except Exception:  # noqa: BLE001  # pylint: disable=broad-except
    # Whatever stops TFDS from finding it (unknown name, bad version) means "not prepared" here; the
    # builder call that follows reports the actual error.
    return False


def builder_for(name: str, data_dir: str | None, download: bool, *, hint: str = ''):
  """The TFDS builder of a prepared dataset (prepared here first when download=True)."""
  tfds = _tfds()
  if not name:
    raise DataError("config.data.name is empty: set it to a TFDS dataset name (e.g. 'sun397')")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    # TFDS raises several types (DatasetNotFoundError, ValueError for a bad version or config, ...).
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f'config.data.name={name!r}: no such TFDS dataset (config.data.data_dir={data_dir!r}): '
                    f'{first}{hint}') from e
  if builder.is_prepared():
    return builder
  if not download:
    raise DataError(f'TFDS dataset {name!r} is not prepared under config.data.data_dir={data_dir!r} (looked in '
                    f'{builder.data_path}); set config.data.download=True to download and prepare it (needs '
                    f'a network), or run `tfds build {name} --data_dir=DIR`{hint}')
  logging.info('downloading and preparing TFDS %s into %s', name, builder.data_path)
  try:
    builder.download_and_prepare(file_format='array_record')
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'downloading TFDS dataset {name!r} into config.data.data_dir={data_dir!r} failed: '
                    f'{type(e).__name__}: {e}{hint}') from e
  return builder


def build_tfds(name: str, split: str, data_dir: str | None, download: bool, *, image_size: int,
               image_key: str = 'image', label_key: str = 'label', max_in_memory_mb: float = 4096,
               hint: str = '', **options) -> ImageSource:
  tfds = _tfds()
  builder = builder_for(name, data_dir, download, hint=hint)
  info = builder.info
  features = info.features
  if image_key not in features:
    raise DataError(f'config.data.image_key={image_key!r} is not a feature of TFDS {name!r} '
                    f'(features: {sorted(features.keys())})')
  if label_key in features and hasattr(features[label_key], 'num_classes'):
    num_classes = int(features[label_key].num_classes)
  else:
    logging.info('TFDS %s has no class label %r: all labels are 0', name, label_key)
    label_key, num_classes = None, 1
  base_split = split.split('[')[0]
  if base_split not in info.splits:
    raise DataError(f'config.data.split={split!r} is not a split of TFDS {name!r} '
                    f'(splits: {sorted(info.splits.keys())}, data_dir {builder.data_path})')
  file_format = str(getattr(info.file_format, 'value', info.file_format) or 'tfrecord')
  tag = f'{name}/{split}'
  common = dict(image_size=image_size, num_classes=num_classes, **options)
  decoders = {image_key: tfds.decode.SkipDecoding()}
  try:
    if file_format in RANDOM_ACCESS_FORMATS:
      data_source = builder.as_data_source(split=split, decoders=decoders)
      return TfdsSource(data_source, label_key, image_key, tag,
                        description=f'TFDS {tag} in {builder.data_path} ({len(data_source)} examples, '
                                    f'{num_classes} classes, {file_format}, random access)', **common)
    size_mb = info.splits[base_split].num_bytes / 2**20
    if size_mb > max_in_memory_mb:
      raise DataError(
          f'TFDS {name!r} in {builder.data_path} is stored as {file_format}, which has no random access, and '
          f'its split {base_split!r} ({size_mb:.0f} MiB) is larger than config.data.max_in_memory_mb='
          f'{max_in_memory_mb}; convert it with `tfds convert_format --dataset_version_dir={builder.data_path} '
          f'--out_file_format=array_record --out_dir=NEW_DIR` (or prepare it with file_format=array_record)')
    logging.info('TFDS %s is %s (no random access): reading %.0f MiB into memory', tag, file_format, size_mb)
    ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
    images, labels = [], []
    for example in ds.as_numpy_iterator():
      images.append(example[image_key])
      labels.append(int(example[label_key]) if label_key else 0)
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'cannot read split config.data.split={split!r} of TFDS {name!r} from '
                    f'{builder.data_path}: {type(e).__name__}: {e}') from e
  return ArraySource(images, np.asarray(labels, np.int64), name_prefix=tag,
                     description=f'TFDS {tag} in {builder.data_path} ({len(images)} examples, {num_classes} '
                                 f'classes, {file_format} read into memory)', **common)
