"""Examples held in memory: uint8 image arrays (Fashion-MNIST, digits) or encoded image bytes (a TFDS split
read whole), decoded one at a time when a batch asks for them."""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from srdd_jax.data import preprocess as pp
from srdd_jax.data.source import ImageSource, Unreadable


def decode_image(value, what: str):
  """A PIL image or uint8 array from encoded bytes or an array; Unreadable when the bytes do not decode."""
  if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim >= 2:
    return value
  if isinstance(value, np.ndarray) and value.dtype == object and value.ndim == 0:
    value = value.item()
  if not isinstance(value, (bytes, bytearray, memoryview)):
    raise Unreadable(f'{what} is neither encoded image bytes nor a uint8 image array '
                     f'({type(value).__name__})')
  try:
    with Image.open(io.BytesIO(value)) as f:
      f.load()
      return pp.to_rgb(f)
  # Any failure to decode these bytes is a property of the bytes (see folder.py).
  except Exception as e:  # pylint: disable=broad-except
    raise Unreadable(pp.decode_error(e)) from e


class ArraySource(ImageSource):

  def __init__(self, images: Sequence, labels: Sequence[int] | np.ndarray, num_classes: int, *,
               image_size: int, description: str, name_prefix: str = 'example', **options):
    if len(images) != len(labels):
      raise ValueError(f'{description}: {len(images)} images but {len(labels)} labels')
    self.images, self.labels, self._prefix = images, np.asarray(labels, np.int64), name_prefix
    super().__init__(num_examples=len(images), num_classes=num_classes, image_size=image_size,
                     description=description, **options)

  def name(self, index: int) -> str:
    return f'{self._prefix}[{index}]'

  def load(self, index: int):
    return decode_image(self.images[index], self.name(index)), int(self.labels[index])
