"""`--mode=sample` and `--mode=edit`: images from converted checkpoints, written as PNG and `.npz`."""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from srdd_jax.convert import params_io
from srdd_jax.diffusion import editing
from srdd_jax.diffusion.filtering import SamplerConfig
from srdd_jax.diffusion.sampler import Sampler, batch_rng
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import multihost
from srdd_jax.parallel.compile import jit_inference


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def _floats(s) -> tuple[float, ...]:
  return tuple(float(x) for x in str(s).split(',') if x.strip())


def _ints(s) -> tuple[int, ...]:
  return tuple(int(x) for x in str(s).split(',') if x.strip())


def sampler_config(c) -> SamplerConfig:
  sched = c.cfg_schedule
  if isinstance(sched, str) and sched not in ('linear', 'constant'):
    sched = _floats(sched)
  try:
    return SamplerConfig(cfg=float(c.cfg), cfg_schedule=sched, temperature=float(c.temperature),
                         top_k=int(c.top_k), top_p=float(c.top_p), greedy=bool(c.greedy),
                         mr_threshold=float(c.mr_threshold), mr_iterations=int(c.mr_iterations),
                         mr_scales=tuple(bool(x) for x in _ints(c.mr_scales)) or None)
  except ValueError as e:
    raise ConfigError(f'config.sampler: {e}') from e


def load_models(config):
  """(Sampler, var params, vae params) from the converted checkpoints named by the config."""
  for key in ('model', 'tokenizer'):
    path = config[key].checkpoint
    if not path:
      raise ConfigError(f'config.{key}.checkpoint is empty: give the directory written by '
                        f'`python -m srdd_jax.tools.convert_var --{"var" if key == "model" else "vae"} ...`')
    if not os.path.isdir(path):
      raise ConfigError(f'config.{key}.checkpoint={path!r} does not exist')
  var_config, var_params = params_io.load_var(config.model.checkpoint)
  vae_config, vae_params = params_io.load_vqvae(config.tokenizer.checkpoint)
  var_config = dataclasses.replace(var_config, dtype=config.model.dtype,
                                   **({'mask': config.model.mask} if config.model.mask else {}))
  if tuple(vae_config.patch_nums) != tuple(var_config.patch_nums):
    vae_config = dataclasses.replace(vae_config, patch_nums=var_config.patch_nums)
  mesh = pm.make_mesh(dict(config.mesh))
  try:
    sampler = Sampler(var_config, vae_config, sampler_config(config.sampler), mesh=mesh)
  except ValueError as e:
    raise ConfigError(f'config.model / config.tokenizer do not fit together: {e}') from e
  rep = pm.replicated(mesh)
  return sampler, jax.device_put(var_params, rep), jax.device_put(vae_params, rep)


def to_uint8(images01) -> np.ndarray:
  return np.asarray(np.clip(np.round(np.asarray(images01) * 255.0), 0, 255), np.uint8)


def grid(images: np.ndarray, cols: int) -> np.ndarray:
  n, h, w, c = images.shape
  rows = -(-n // cols)
  g = np.full((rows * h, cols * w, c), 255, np.uint8)
  for i, im in enumerate(images):
    r, k = divmod(i, cols)
    g[r * h:(r + 1) * h, k * w:(k + 1) * w] = im
  return g


def run_sample(config, workdir: str) -> dict:
  sampler, var_params, vae_params = load_models(config)
  nc = sampler.var_config.num_classes
  classes = _ints(config.sample.classes) or tuple(range(nc))
  bad = [k for k in classes if not 0 <= k < nc]
  if bad:
    raise ConfigError(f'config.sample.classes: class id {bad[0]} is out of range for a model with {nc} '
                      f'classes (0..{nc - 1})')
  per = int(config.sample.num_per_class)
  if per < 1:
    raise ConfigError(f'config.sample.num_per_class={per}: must be >= 1')
  labels = np.repeat(np.asarray(classes, np.int32), per)
  bs = int(config.sample.batch_size)
  out_dir = os.path.join(workdir, 'samples')
  os.makedirs(os.path.join(out_dir, 'images'), exist_ok=True)
  t0 = time.time()
  images = generate(sampler, var_params, vae_params, labels, bs, int(config.seed), key='config.sample.batch_size')
  if not multihost.is_main_process():  # Process 0 writes; every process took part in sampling.
    return {'num_images': int(len(images))}
  np.savez(os.path.join(out_dir, 'samples.npz'), arr_0=images, arr_1=labels)
  for i, (im, k) in enumerate(zip(images, labels)):
    Image.fromarray(im).save(os.path.join(out_dir, 'images', f'class{k:04d}_{i:06d}.png'))
  Image.fromarray(grid(images, per)).save(os.path.join(out_dir, 'grid.png'))
  summary = {'num_images': int(len(images)), 'classes': list(map(int, classes)), 'per_class': per,
             'mask': sampler.mask, 'sampler': dataclasses.asdict(sampler.config),
             'seconds': round(time.time() - t0, 2),
             'outputs': ['samples/grid.png (a row per class)', 'samples/images/*.png',
                         'samples/samples.npz (arr_0 uint8 NHWC, arr_1 labels)']}
  with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary


def generate(sampler, var_params, vae_params, labels, batch_size: int, seed: int,
             key: str = 'batch_size') -> np.ndarray:
  """uint8 NHWC images for `labels`, batch by batch; batch i uses the key batch_rng(seed, i), so no two
  batches share noise. Each batch is split over the mesh's batch axes; the last one is padded to the
  compiled size and trimmed."""
  mesh = sampler.mesh
  n_par = mesh.shape['data'] * mesh.shape['fsdp'] if mesh is not None else 1
  if batch_size < 1 or batch_size % n_par:
    raise ConfigError(f'{key}={batch_size} must be a positive multiple of the data-parallel size {n_par}')
  fn = jit_inference(sampler.sample)
  out, t0 = [], time.time()
  labels = np.asarray(labels, np.int32)
  for bi, start in enumerate(range(0, len(labels), batch_size)):
    lab = labels[start:start + batch_size]
    pad = batch_size - len(lab)
    full = np.concatenate([lab, np.repeat(lab[-1:], pad)])
    if mesh is not None:
      full = jax.device_put(full, NamedSharding(mesh, PartitionSpec(('data', 'fsdp'))))
    _, img = fn(var_params, vae_params, full, batch_rng(seed, bi))
    out.append(to_uint8(multihost.gather(img))[:len(lab)])
    done = start + len(lab)
    rate = done / (time.time() - t0)
    logging.info('sampled %d/%d images (%.2f img/s, ETA %.0fs)', done, len(labels), rate,
                 (len(labels) - done) / rate)
  return np.concatenate(out)


def load_image(path: str, size: int) -> np.ndarray:
  """RGB image -> (size, size, 3) in [-1, 1]: center crop to a square, Lanczos resize."""
  if not path or not os.path.isfile(path):
    raise ConfigError(f'config.edit.image={path!r}: no such image file')
  try:
    im = Image.open(path).convert('RGB')
  except OSError as e:
    raise ConfigError(f'config.edit.image={path!r}: unreadable image ({e})') from e
  w, h = im.size
  s = min(w, h)
  im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
  im = im.resize((size, size), Image.LANCZOS)
  return np.asarray(im, np.float32) / 127.5 - 1.0


def run_edit(config, workdir: str) -> dict:
  sampler, var_params, vae_params = load_models(config)
  e = config.edit
  if e.task not in editing.TASKS:
    raise ConfigError(f'config.edit.task={e.task!r}: must be one of {editing.TASKS}')
  size = sampler.tokenizer.config.image_size
  img = load_image(e.image, size)
  n = int(e.num_samples)
  nc = sampler.var_config.num_classes
  cls = int(e.class_id)
  if e.task == 'class_edit' and not 0 <= cls < nc:
    raise ConfigError(f'config.edit.class_id={cls}: class_edit needs a class in 0..{nc - 1}')
  labels = np.full((n,), cls if (e.task == 'class_edit' or 0 <= cls < nc) else nc, np.int32)
  if cls >= nc:
    raise ConfigError(f'config.edit.class_id={cls} is out of range for a model with {nc} classes')
  editor = editing.Editor(sampler)
  rng = batch_rng(config.seed, 0)
  shown = img
  if e.task == 'super_res':
    low = img
    if int(e.low_res):
      low = np.asarray(jax.image.resize(img, (int(e.low_res), int(e.low_res), 3), 'lanczos3'))
    keep = int(e.keep_scales) or editing.default_sr_keep_scales(low.shape[0], size,
                                                                sampler.var_config.patch_nums)
    batch = jnp.asarray(np.repeat(low[None], n, 0))
    _, out, _, _ = jit_inference(editor.super_resolve, static_argnums=3)(var_params, vae_params, batch, keep,
                                                                   labels, rng)
    shown = np.asarray(jax.image.resize(low, (size, size, 3), 'nearest'))
    info = {'low_res': int(low.shape[0]), 'keep_scales': keep}
  else:
    if e.mask:
      m = load_image(e.mask, size).mean(-1) > 0
      pixel_keep = m.astype(np.float32)
    elif e.box:
      box = _ints(e.box)
      if len(box) != 4:
        raise ConfigError(f'config.edit.box={e.box!r}: expected x0,y0,x1,y1')
      try:
        pixel_keep = editing.box_keep_mask(size, box, keep_inside=e.task != 'inpaint')
      except ValueError as err:
        raise ConfigError(f'config.edit.box: {err}') from err
    else:
      raise ConfigError('config.edit.box or config.edit.mask is required for ' + e.task)
    latent = editing.latent_keep_mask(pixel_keep, sampler.tokenizer.config.downsample)
    batch = jnp.asarray(np.repeat(img[None], n, 0))
    _, out, _, _ = jit_inference(editor.edit)(var_params, vae_params, batch,
                                        np.repeat(latent[None], n, 0), labels, rng)
    shown = img * (0.25 + 0.75 * pixel_keep[..., None])
    info = {'kept_pixels': float(pixel_keep.mean())}
  out = to_uint8(out)
  src = to_uint8((shown + 1) / 2)
  out_dir = os.path.join(workdir, 'edit')
  os.makedirs(out_dir, exist_ok=True)
  Image.fromarray(grid(np.concatenate([src[None], out]), n + 1)).save(
      os.path.join(out_dir, f'{e.task}_grid.png'))
  np.savez(os.path.join(out_dir, f'{e.task}.npz'), arr_0=out, arr_1=labels)
  summary = {'task': e.task, 'num_samples': n, 'labels': labels.tolist(), **info,
             'outputs': [f'edit/{e.task}_grid.png (input, then the edits)', f'edit/{e.task}.npz']}
  with open(os.path.join(out_dir, f'{e.task}_summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary
