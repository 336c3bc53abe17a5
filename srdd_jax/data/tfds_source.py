"""TFDS datasets by name, split and data_dir, read by random access.

A dataset prepared as array_record (or parquet) is read with `builder.as_data_source` (one reader per
thread, so the reads run in parallel): any example by index, nothing held in memory. A dataset prepared as
tfrecord has no index; the byte offset of every record of the split is found once by reading the
records' 12-byte headers (20 bytes per example kept), and examples are read from their files when asked
for: no host holds the split in memory.

Nothing is downloaded unless `download=True`: a dataset not prepared under data_dir fails at once instead of
reaching for the network, which on an offline machine could hang.
"""
from __future__ import annotations

import struct
import threading

import numpy as np
from absl import logging

from srdd_jax import files
from srdd_jax.data.arrays import decode_image
from srdd_jax.data.source import DataError, ImageSource, Unreadable

RANDOM_ACCESS_FORMATS = ('array_record', 'parquet')


def _tfds():
  # Deferred: importing TFDS pulls in TensorFlow lazily, but only TFDS sources need either.
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tfds


class TfdsSource(ImageSource):
  """Random access to a prepared array_record/parquet split; `open_source()` makes a reader."""

  def __init__(self, open_source, label_key: str | None, image_key: str, tag: str, **kwargs):
    self._open, self._image_key, self._label_key, self._tag = open_source, image_key, label_key, tag
    self._local = threading.local()  # A reader per thread: readers are not made for concurrent reads.
    super().__init__(num_examples=len(self._reader()), **kwargs)

  def _reader(self):
    reader = getattr(self._local, 'reader', None)
    if reader is None:
      reader = self._local.reader = self._open()
    return reader

  def name(self, index: int) -> str:
    return f'{self._tag}[{index}]'

  def load(self, index: int):
    example = self._reader()[index]
    label = int(example[self._label_key]) if self._label_key else 0
    return decode_image(example[self._image_key], self.name(index)), label


# A tfrecord record: length (uint64), its masked CRC (uint32), the bytes, their masked CRC (uint32).
_RECORD_HEADER = struct.Struct('<QI')


def record_offsets(path: str, skip: int, take: int) -> list[tuple[int, int]]:
  """(offset, length) of records skip .. skip+take-1 of the tfrecord file `path`, from their headers."""
  out = []
  with files.open(path, 'rb') as f:
    offset = 0
    for k in range(skip + take):
      header = f.read(_RECORD_HEADER.size)
      if len(header) < _RECORD_HEADER.size:
        raise DataError(f'{path}: ends after {k} records, {skip + take} expected (a truncated file?)')
      length = _RECORD_HEADER.unpack(header)[0]
      if k >= skip:
        out.append((offset + _RECORD_HEADER.size, length))
      offset += _RECORD_HEADER.size + length + 4
      f.seek(offset)
  return out


class TfrecordSource(ImageSource):
  """Random access to a split stored as tfrecord: every record's file and byte offset, found once from
  the headers; each example read from its file when asked for (a file handle per thread)."""

  def __init__(self, instructions, features, decoders, label_key: str | None, image_key: str, tag: str,
               **kwargs):
    self._paths = [fi.filename for fi in instructions]
    where = [(i, o, n) for i, fi in enumerate(instructions)
             for o, n in record_offsets(fi.filename, fi.skip, fi.take)]
    self._file = np.array([w[0] for w in where], np.int32)
    self._offset = np.array([w[1] for w in where], np.int64)
    self._length = np.array([w[2] for w in where], np.int64)
    self._features, self._decoders = features, decoders
    self._image_key, self._label_key, self._tag = image_key, label_key, tag
    self._local = threading.local()
    super().__init__(num_examples=len(where), **kwargs)

  def name(self, index: int) -> str:
    return f'{self._tag}[{index}]'

  def _handle(self, i: int):
    handles = getattr(self._local, 'handles', None)
    if handles is None:
      handles = self._local.handles = {}
    if i not in handles:
      handles[i] = files.open(self._paths[i], 'rb')
    return handles[i]

  def load(self, index: int):
    f = self._handle(int(self._file[index]))
    f.seek(int(self._offset[index]))
    data = f.read(int(self._length[index]))
    if len(data) != self._length[index]:
      raise Unreadable(f'{self._paths[self._file[index]]} ends inside record {index}')
    example = self._features.deserialize_example_np(data, decoders=self._decoders)
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
               image_key: str = 'image', label_key: str = 'label', hint: str = '', **options) -> ImageSource:
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
      open_source = lambda: builder.as_data_source(split=split, decoders=decoders)
      source = TfdsSource(open_source, label_key, image_key, tag, description=f'TFDS {tag} in {builder.data_path} '
                          f'({{n}} examples, {num_classes} classes, {file_format}, random access)', **common)
    elif file_format == 'tfrecord':
      source = TfrecordSource(info.splits[split].file_instructions, features, decoders, label_key, image_key, tag,
                              description=f'TFDS {tag} in {builder.data_path} ({{n}} examples, {num_classes} '
                                          'classes, tfrecord, read by offset)', **common)
    else:
      raise DataError(f'TFDS {name!r} in {builder.data_path} is stored as {file_format}, which this reader does '
                      f'not read; convert it with `tfds convert_format --dataset_version_dir={builder.data_path} '
                      '--out_file_format=array_record --out_dir=NEW_DIR`')
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'cannot read split config.data.split={split!r} of TFDS {name!r} from '
                    f'{builder.data_path}: {type(e).__name__}: {e}') from e
  source.description = source.description.replace('{n}', str(source.num_examples))
  return source
