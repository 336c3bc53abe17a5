"""Checks of `kind='fid_inception'` reference files: the FID Inception port against pytorch-fid's outputs.

A file holds `inception/*` weights (PyTorch layout, any float dtype), `images` (B, 3, H, W) in [0, 1]
and any of `pool3` (B, 2048) and `logits` (B, 1008). Batch and image size are read from the arrays.
"""
from __future__ import annotations

import numpy as np

from srdd_jax.evaluation import inception_weights as fid_inception
from srdd_jax.convert import state_dict as sd
from srdd_jax.evaluation import inception
from srdd_jax.tools import reference_common as rc


def check_fid_inception(z, meta: dict, path: str) -> list[rc.Result]:
  del meta  # Everything the check needs is in the arrays.
  weight_keys = [k for k in z.files if k.startswith(fid_inception.NPZ_PREFIX)]
  used = {'meta', *weight_keys}
  try:
    params = fid_inception.convert_inception(
        {k[len(fid_inception.NPZ_PREFIX):]: z[k] for k in weight_keys})
  except sd.StateDictMismatch as e:
    return [rc.Result('inception/* weights', rc.FAIL, str(e))]
  results = [rc.Result('inception/* weights', rc.PASS, f'{len(weight_keys)} keys converted')]

  outputs = [k for k in ('pool3', 'logits') if k in z.files]
  if outputs:
    if 'images' not in z.files:
      raise rc.ReferenceFormatError(f'{path}: has {outputs} but no `images` entry to compute them from')
    used.add('images')
    images = rc.nchw_to_nhwc(z['images']).astype(np.float32)
    try:
      inception.check_images(images, f'{path}: images')
    except ValueError as e:
      raise rc.ReferenceFormatError(str(e)) from e
    side = f'{images.shape[1]}x{images.shape[2]}'
    ours = inception.extract(params, images)
    for key in outputs:
      used.add(key)
      results.append(rc.rel_result(key, ours[key], z[key],
                                   how=f' (images {side} -> bilinear 299 -> network)'))
    if 'pool3' in outputs and len(images) > 1:
      results.append(_input_sensitivity(np.asarray(z['pool3'], np.float64)))
  for key in z.files:
    if key not in used:
      results.append(rc.Result(key, rc.NOT_CHECKED, 'no check for this entry'))
  return results


def _input_sensitivity(pool3) -> rc.Result:
  # Random weights can wash the image out of the features (the BatchNorm statistics of
  # fid_inception.npz do: its two images' pool3 agree to ~1e-7). A check on such a file tests mostly
  # the last layers, which the reader of the report should know.
  spread = max(float(np.linalg.norm(p - pool3[0])) for p in pool3[1:]) / max(
      float(np.linalg.norm(pool3[0])), 1e-30)
  detail = f'pool3 of the {len(pool3)} reference images differ by at most {spread:.1e} relative'
  if spread < 10 * rc.REL_TOL:
    detail += ('; the features barely depend on the image, so this file checks mostly the last '
               'layers (a file with image-dependent features checks the whole network)')
  return rc.Result('pool3 input sensitivity', rc.INFO, detail)
