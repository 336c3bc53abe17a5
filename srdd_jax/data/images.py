"""Image arrays for writing: float images to uint8, and grids of images."""
from __future__ import annotations

import numpy as np


def to_uint8(images01) -> np.ndarray:
  """Images in [0, 1] -> uint8 (rounded, clipped)."""
  return np.asarray(np.clip(np.round(np.asarray(images01) * 255.0), 0, 255), np.uint8)


def signed_to_uint8(images) -> np.ndarray:
  """Images in [-1, 1] (the tokenizer's range) -> uint8 (rounded, clipped)."""
  return np.asarray(np.clip(np.round((np.asarray(images) + 1) * 127.5), 0, 255), np.uint8)


def grid(images: np.ndarray, cols: int) -> np.ndarray:
  """uint8 NHWC images -> one image, `cols` per row, white where a row is short."""
  n, h, w, c = images.shape
  rows = -(-n // cols)
  g = np.full((rows * h, cols * w, c), 255, np.uint8)
  for i, im in enumerate(images):
    r, k = divmod(i, cols)
    g[r * h:(r + 1) * h, k * w:(k + 1) * w] = im
  return g
