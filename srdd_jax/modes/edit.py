"""`--mode=edit`: zero-shot editing (inpaint, outpaint, class_edit, super_res) of one image with a
trained or converted model: WORKDIR/edit/<task>/ holds the input and the edits as a grid (grid.png), the
edits as edits.npz and summary.json; that folder is replaced whole once new edits are complete."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from srdd_jax import files
from srdd_jax.config import ConfigError, ints, unset_or_at_least, with_defaults
from srdd_jax.data.images import grid, to_uint8
from srdd_jax.data.preprocess import to_rgb
from srdd_jax.diffusion import editing
from srdd_jax.diffusion.generate import sampler_from_config
from srdd_jax.diffusion.grids import GRID_PIXELS
from srdd_jax.diffusion.sampler import batch_rng
from srdd_jax.parallel import multihost
from srdd_jax.parallel.compile import jit_inference
from srdd_jax.parallel.workdir import Outputs


def open_image(path: str, key: str) -> Image.Image:
  """The RGB image at `path`; errors name the config `key`."""
  if not path or not files.isfile(path):
    raise ConfigError(f'{key}={path!r}: no such image file')
  try:
    with files.load_image(path) as f:
      # Every mode converted from its own range, or refused with the reason (ValueError, below).
      return to_rgb(f).copy()
  except OSError as e:  # PIL names the file object it read (an address): left out, the line is the same each run.
    raise ConfigError(f'{key}={path!r}: unreadable image ({re.sub(r" <[^>]*>", "", str(e))})') from e
  except ValueError as e:
    raise ConfigError(f'{key}={path!r}: {e}') from e


def square(im: Image.Image, size: int) -> np.ndarray:
  """RGB image -> (size, size, 3) in [-1, 1]: center crop to a square, Lanczos resize."""
  w, h = im.size
  s = min(w, h)
  im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
  im = im.resize((size, size), Image.LANCZOS)
  return np.asarray(im, np.float32) / 127.5 - 1.0


def check(e) -> None:
  """config.edit's values (`--dry_run` too); `check_files` then reads the image and the mask."""
  if e.task not in editing.TASKS:
    raise ConfigError(f'config.edit.task={e.task!r}: must be one of {editing.TASKS}')
  if int(e.num_samples) < 1:
    raise ConfigError(f'config.edit.num_samples={e.num_samples}: must be >= 1')
  for key in ('low_res', 'keep_scales'):
    if int(e[key]) < 0:
      raise ConfigError(f'config.edit.{key}={e[key]}: must be >= 0 (0 = derived)')
  if e.task != 'super_res' and e.box and not e.mask:
    box = ints(e.box, 'config.edit.box')
    if len(box) != 4:
      raise ConfigError(f'config.edit.box={e.box!r}: expected x0,y0,x1,y1')
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 and 0 <= y0 < y1):
      raise ConfigError(f'config.edit.box={e.box!r}: x0,y0,x1,y1 with 0 <= x0 < x1 and 0 <= y0 < y1 (the '
                        'corners top left, then bottom right, end-exclusive)')
  unset_or_at_least(int(e.class_id), 'config.edit.class_id', 0, meaning='is unconditional (the null class)')
  if e.task == 'class_edit' and int(e.class_id) == -1:
    raise ConfigError('config.edit.class_id=-1: class_edit needs a class (the class the edits are drawn for)')




def max_edits(image_size: int) -> int:
  """The most edits of one image: all of them are drawn in one batch and shown, after the input, in one row
  of grid.png, so the row's pixels bound them (and with them the inputs' batch on the host: 1 GB of float32)."""
  return GRID_PIXELS // (image_size * image_size) - 1


def check_model(e, num_classes: int, image_size: int) -> None:
  """config.edit's values against the model: its classes and its image size (the box's bounds, the count
  of edits one grid holds)."""
  if int(e.num_samples) > max_edits(image_size):
    raise ConfigError(f'config.edit.num_samples={e.num_samples}: at most {max_edits(image_size)} for this model\'s '
                      f'{image_size} px images (the edits are drawn in one batch and shown in one row of grid.png, '
                      f'which must stay within {GRID_PIXELS} pixels, the most Pillow opens without a warning)')
  if e.task != 'super_res' and not e.box and not e.mask:
    raise ConfigError(f'config.edit.box or config.edit.mask is required for {e.task}')
  cls = int(e.class_id)
  if cls >= num_classes:
    raise ConfigError(f'config.edit.class_id={cls} is out of range for a model with {num_classes} classes '
                      f'(0..{num_classes - 1}, or -1 for unconditional)')
  if e.task != 'super_res' and e.box and not e.mask:
    try:
      editing.box_keep_mask(image_size, ints(e.box, 'config.edit.box'), keep_inside=True)
    except ValueError as err:
      raise ConfigError(f'config.edit.box: {err}') from err
  if e.task == 'super_res' and int(e.low_res) > image_size:
    raise ConfigError(f'config.edit.low_res={e.low_res}: must be at most the model\'s {image_size} px')


def check_keep_scales(e, num_scales: int) -> None:
  if e.task == 'super_res' and int(e.keep_scales) >= num_scales:
    raise ConfigError(f'config.edit.keep_scales={e.keep_scales}: the model has {num_scales} scales; keep '
                      f'at most {num_scales - 1} (0 = those the low-res image determines)')


def check_files(e) -> None:
  """The image (and mask) config.edit names: readable, of one size; before the models are loaded."""
  image = open_image(e.image, 'config.edit.image')
  if e.task != 'super_res' and e.mask:
    mask = open_image(e.mask, 'config.edit.mask')
    if mask.size != image.size:
      raise ConfigError(f'config.edit.mask={e.mask!r} is {mask.size[0]}x{mask.size[1]} but config.edit.image '
                        f'is {image.size[0]}x{image.size[1]}: the mask must have the size of the image')


def run(config, workdir: str, overwrite: bool = False) -> dict:
  config = with_defaults(config)
  e = config.edit
  check(e)
  check_files(e)
  sampler, var_params, vae_params = sampler_from_config(config)
  size = sampler.tokenizer.config.image_size
  img = square(open_image(e.image, 'config.edit.image'), size)
  n = int(e.num_samples)
  nc = sampler.var_config.num_classes
  cls = int(e.class_id)
  check_model(e, nc, size)
  labels = np.full((n,), cls if cls >= 0 else nc, np.int32)  # nc: the null class, unconditional.
  # The inputs work; only now do earlier outputs stand in the way.
  outputs = Outputs(files.join(workdir, 'edit', e.task), f'{e.task} edits', overwrite)
  if multihost.is_main_process():
    outputs.claim()
  editor = editing.Editor(sampler)
  rng = batch_rng(config.seed, 0)
  shown = img
  if e.task == 'super_res':
    low = img
    if int(e.low_res):
      low = np.asarray(jax.image.resize(img, (int(e.low_res), int(e.low_res), 3), 'lanczos3'))
    check_keep_scales(e, sampler.var_config.num_scales)
    keep = int(e.keep_scales) or editing.default_sr_keep_scales(low.shape[0], size,
                                                                sampler.var_config.patch_nums)
    batch = jnp.asarray(np.repeat(low[None], n, 0))
    _, out, _, _ = jit_inference(editor.super_resolve, static_argnums=3)(var_params, vae_params, batch, keep,
                                                                   labels, rng)
    shown = np.asarray(jax.image.resize(low, (size, size, 3), 'nearest'))
    info = {'low_res': int(low.shape[0]), 'keep_scales': keep}
  else:
    if e.mask:
      m = square(open_image(e.mask, 'config.edit.mask'), size).mean(-1) > 0
      pixel_keep = m.astype(np.float32)
    else:  # A box, checked against the model's size by check_model.
      pixel_keep = editing.box_keep_mask(size, ints(e.box, 'config.edit.box'), keep_inside=e.task != 'inpaint')
    latent = editing.latent_keep_mask(pixel_keep, sampler.tokenizer.config.downsample)
    batch = jnp.asarray(np.repeat(img[None], n, 0))
    _, out, _, _ = jit_inference(editor.edit)(var_params, vae_params, batch,
                                        np.repeat(latent[None], n, 0), labels, rng)
    shown = img * (0.25 + 0.75 * pixel_keep[..., None])
    info = {'kept_pixels': float(pixel_keep.mean())}
  out = to_uint8(out)
  src = to_uint8((shown + 1) / 2)
  if not multihost.is_main_process():
    return {'task': e.task, 'num_samples': n}
  out_dir = outputs.begin()
  files.save_image(files.join(out_dir, 'grid.png'), grid(np.concatenate([src[None], out]), n + 1))
  files.save_npz(files.join(out_dir, 'edits.npz'), arr_0=out, arr_1=labels)
  summary = {'task': e.task, 'num_samples': n, 'labels': labels.tolist(), **info,
             'outputs': [f'edit/{e.task}/grid.png (input, then the edits)', f'edit/{e.task}/edits.npz']}
  files.write_json(files.join(out_dir, 'summary.json'), summary)
  outputs.commit()
  return summary
