"""VAR's image preprocessing on one image: RGB, shorter side to round(ratio*res) (Lanczos), crop, flip, [-1, 1].

It follows VAR's torchvision pipeline (Resize(int) with LANCZOS, RandomCrop/CenterCrop, optional
RandomHorizontalFlip, ToTensor, x*2-1) on PIL images, so the same file gives the same pixels. The random
parts are passed in as numbers (crop position as two fractions in [0, 1), flip as a bool) so that the caller
decides where randomness comes from; this module draws nothing.
"""
from __future__ import annotations

import math
import re

import numpy as np
from PIL import Image


# TIFF tags: bits per sample, and how a sample is stored (1 unsigned, 2 signed integer, 3 IEEE float).
_BITS_PER_SAMPLE, _SAMPLE_FORMAT = 258, 339


def _full_scale(image: Image.Image, a: np.ndarray) -> float:
  """The value of white of a 32-bit integer ('I') image: what its file says (a TIFF's bits per sample),
  else 16 bits (PNG and PNM store 16-bit greyscale in this mode) when every value fits them."""
  tags = getattr(image, 'tag_v2', None) or {}
  bits = tags.get(_BITS_PER_SAMPLE)
  bits = int(bits[0] if isinstance(bits, tuple) else bits) if bits else None
  fmt = tags.get(_SAMPLE_FORMAT)
  fmt = int(fmt[0] if isinstance(fmt, tuple) else fmt) if fmt else 1
  if bits:
    return float(2 ** (bits - 1 if fmt == 2 else bits) - 1)
  if a.size and a.max() > 65535:
    raise ValueError(f'a 32-bit integer image whose file does not say its range, with values up to {a.max()}: '
                     'save it as an 8- or 16-bit image (or a TIFF, which says its bits per sample)')
  return 65535.0


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
  """An RGB PIL image from a PIL image of any mode or a uint8 array (H, W), (H, W, 1), (H, W, 3), (H, W, 4);
  ValueError saying why for an image that has no meaning as 8-bit RGB. The 16- and 32-bit modes are scaled
  from their own range: PIL's convert('RGB') clips them at 255, so a float image in [0, 1] turned black, a
  16-bit one white and a 32-bit integer one wrapped into noise."""
  if isinstance(image, np.ndarray):
    a = image
    if a.ndim == 3 and a.shape[-1] == 1:
      a = a[..., 0]
    if a.dtype != np.uint8:
      raise ValueError(f'expected a uint8 image array, got {a.dtype}')
    if a.ndim == 2:
      image = Image.fromarray(a, 'L')
    elif a.ndim == 3 and a.shape[-1] in (3, 4):
      image = Image.fromarray(a, 'RGB' if a.shape[-1] == 3 else 'RGBA')
    else:
      raise ValueError(f'expected an image array (H, W[, 1|3|4]), got shape {a.shape}')
  if image.mode == 'F':  # Float samples: [0, 1] is the only range with a meaning (white = 1).
    a = np.asarray(image, np.float64)
    if not np.all(np.isfinite(a)):  # Named apart: the range of the finite rest could be [0, 1] itself.
      raise ValueError(f'a float image with {np.count_nonzero(~np.isfinite(a))} NaN or infinite values: save it '
                       'in [0, 1], or as an 8- or 16-bit image')
    if a.size and (a.min() < 0 or a.max() > 1):
      raise ValueError(f'a float image with values in [{a.min():.4g}, {a.max():.4g}]: only [0, 1] has a known '
                       'meaning; save it in [0, 1], or as an 8- or 16-bit image')
    image = Image.fromarray(np.rint(a * 255).astype(np.uint8), 'L')
  elif image.mode.startswith('I'):
    a = np.asarray(image, np.int64)
    # Pillow opens a 16-bit PNG as 'I;16' (newer) or 'I' (older, and PNM): the high byte either way, so
    # the same file gives the same pixels whichever Pillow reads it.
    full = 65535.0 if image.mode.startswith('I;16') else _full_scale(image, a)
    if a.size and a.min() < 0:  # Only a 32-bit 'I' image can hold them.
      raise ValueError(f'a signed 32-bit image with negative values (down to {a.min()}): save it as an 8- or '
                       '16-bit image')
    a = a >> 8 if full == 65535 else np.rint(np.minimum(a / full, 1.0) * 255)
    image = Image.fromarray(a.astype(np.uint8), 'L')
  if image.mode == 'RGB':
    return image
  try:
    # VAR's loader is Image.convert('RGB'): alpha is dropped, not composited, and we do the same.
    return image.convert('RGB')
  except ValueError as e:  # A mode PIL cannot convert to RGB.
    raise ValueError(f'an image of mode {image.mode!r}, which cannot be converted to RGB ({e})') from None


def decode_error(e: Exception) -> str:
  """What a failed decode says of its file, for the warning that skips it: the exception's type and text,
  without the address of the file object PIL names (<_io.BytesIO object at 0x...>), so that the same
  file gives the same line on every run and host."""
  return f'{type(e).__name__}: {re.sub(r" <[^>]*>", "", str(e))}'


def resize_shorter(image: Image.Image, shorter: int) -> Image.Image:
  """Shorter side to `shorter` with Lanczos; the longer side as torchvision's Resize(int) computes it."""
  w, h = image.size
  if min(w, h) == shorter:
    return image
  if w <= h:
    size = (shorter, int(shorter * h / w))
  else:
    size = (int(shorter * w / h), shorter)
  return image.resize(size, Image.Resampling.LANCZOS)


def crop_offsets(height: int, width: int, size: int, uv: tuple[float, float] | None) -> tuple[int, int]:
  """(top, left) of a size x size crop: centred like torchvision's CenterCrop when uv is None, else the
  uniform position picked by the fractions uv in [0, 1) (torchvision's RandomCrop draws the same law)."""
  if height < size or width < size:
    raise ValueError(f'cannot crop {size}x{size} from a {height}x{width} image')
  if uv is None:
    return round((height - size) / 2.0), round((width - size) / 2.0)
  top = min(math.floor(uv[0] * (height - size + 1)), height - size)
  left = min(math.floor(uv[1] * (width - size + 1)), width - size)
  return top, left


def pixels(image: Image.Image | np.ndarray, image_size: int, resize_ratio: float = 1.125,
           crop_uv: tuple[float, float] | None = None, flip: bool = False) -> np.ndarray:
  """(image_size, image_size, 3) uint8, the pixels `preprocess` maps to [-1, 1]: what is sent to the
  devices (a quarter of float32's bytes), normalised there by `to_model_range`."""
  image = resize_shorter(to_rgb(image), round(resize_ratio * image_size))
  top, left = crop_offsets(image.height, image.width, image_size, crop_uv)
  # Flipping after the crop is the same law as VAR's flip-then-random-crop (a random crop of a mirror is
  # the mirror of a random crop).
  out = np.asarray(image.crop((left, top, left + image_size, top + image_size)), np.uint8)
  return np.ascontiguousarray(out[:, ::-1] if flip else out)


def to_model_range(x):
  """uint8 pixels -> float32 in [-1, 1] (ToTensor, then x*2-1), on the host (numpy) or on the devices
  (a jax array, inside a jitted step); float input is taken as already there (synthetic images). The
  same float32 operations either way, so both give the same bits."""
  if x.dtype == np.uint8:
    # One rounding, the same on any backend: the difference is exact (half-integers), and a product
    # (XLA turns a division by a constant into one; x * c - 1 it may fuse into one FMA).
    return (x.astype(np.float32) - np.float32(127.5)) * np.float32(1 / 127.5)
  return x.astype(np.float32)


def preprocess(image: Image.Image | np.ndarray, image_size: int, resize_ratio: float = 1.125,
               crop_uv: tuple[float, float] | None = None, flip: bool = False) -> np.ndarray:
  """(image_size, image_size, 3) float32 in [-1, 1]; crop_uv None means a centre crop."""
  return to_model_range(pixels(image, image_size, resize_ratio, crop_uv, flip))
