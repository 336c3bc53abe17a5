"""VAR's image preprocessing on one image: RGB, shorter side to round(ratio*res) (Lanczos), crop, flip, [-1, 1].

It follows VAR's torchvision pipeline (Resize(int) with LANCZOS, RandomCrop/CenterCrop, optional
RandomHorizontalFlip, ToTensor, x*2-1) on PIL images, so the same file gives the same pixels. The random
parts are passed in as numbers (crop position as two fractions in [0, 1), flip as a bool) so that the caller
decides where randomness comes from; this module draws nothing.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
  """An RGB PIL image from a PIL image of any mode or a uint8 array (H, W), (H, W, 1), (H, W, 3), (H, W, 4)."""
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
  if image.mode in ('I', 'I;16', 'I;16B', 'I;16L'):
    # 16-bit greyscale: PIL's convert('RGB') would clip everything above 255 to white.
    a = np.asarray(image, np.uint32) >> 8
    image = Image.fromarray(a.astype(np.uint8), 'L')
  # VAR's loader is Image.convert('RGB'): alpha is dropped, not composited, and we do the same.
  return image if image.mode == 'RGB' else image.convert('RGB')


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
