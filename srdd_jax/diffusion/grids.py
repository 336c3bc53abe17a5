"""Sample grids of a model being trained: the same classes and the same noise at every evaluation, as a
PNG under DIR/samples/ and a TensorBoard image (--mode=train, --mode=distill)."""
from __future__ import annotations

import jax
import numpy as np

from srdd_jax import files
from srdd_jax.config import ConfigError, ints
from srdd_jax.data.images import grid, to_uint8
from srdd_jax.diffusion.generate import decode_precision, sampler_config_for
from srdd_jax.diffusion.sampler import Sampler
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import multihost
from srdd_jax.parallel.compile import jit_inference


# The most pixels a grid PNG may have: Pillow's default MAX_IMAGE_PIXELS, above which opening it warns of a
# decompression bomb (and refuses at twice this).
GRID_PIXELS = 89_478_485


def grid_labels(config, num_classes: int, image_size: int) -> tuple[list[int], int]:
  """(classes, samples per class) of the training grids (config.sample.classes, else the first 10 classes;
  config.sample.num_per_class), checked: every grid is one batch drawn at once and one PNG, so its
  pixels bound it."""
  classes = list(ints(config.sample.classes, 'config.sample.classes')) or list(range(min(num_classes, 10)))
  bad = [k for k in classes if not 0 <= k < num_classes]
  if bad:
    raise ConfigError(f'config.sample.classes: class {bad[0]} is out of range 0..{num_classes - 1}')
  per = max(int(config.sample.num_per_class), 1)
  most = GRID_PIXELS // (len(classes) * image_size * image_size)
  if per > most:
    raise ConfigError(f'config.sample.num_per_class={config.sample.num_per_class}: at most {most} for the '
                      f'training grids (config.train.sample_every > 0) of {len(classes)} class(es) at {image_size} px: '
                      f'each grid is drawn in one batch and saved as one PNG of at most {GRID_PIXELS} pixels')
  return classes, per


class SampleGrids:
  """Sample grids of the model being trained: PNG under DIR/samples/ and a TensorBoard image."""

  def __init__(self, config, var_config, vq, mesh, workdir):
    sc = sampler_config_for(config.sampler, var_config)  # Its errors name config.sampler's keys.
    try:
      self.sampler = Sampler(var_config, vq, sc, mesh=mesh, decode_precision=decode_precision(config.sampler))
    except ValueError as e:
      raise ConfigError(f'config.sampler: {e}') from e
    classes, self.per = grid_labels(config, var_config.num_classes, vq.image_size)
    labels = np.repeat(np.asarray(classes, np.int32), self.per)
    self.n = len(labels)
    pad = -len(labels) % pm.data_parallel_size(mesh)  # Padded to split over the batch axes, trimmed after.
    self.labels = jax.device_put(np.concatenate([labels, np.repeat(labels[-1:], pad)]), pm.replicated(mesh))
    self.fn = jit_inference(self.sampler.sample)
    self.seed = int(config.seed)
    self.dir = files.join(workdir, 'samples')

  def write(self, step, var_params, vae_params, writer):
    # The same key at every step, so grids of successive steps show the same noise evolving.
    _, images = self.fn(var_params, vae_params, self.labels, jax.random.PRNGKey(self.seed))
    images = to_uint8(multihost.gather(images))[:self.n]
    if not multihost.is_main_process():
      return None
    g = grid(images, self.per)
    path = files.join(self.dir, f'step_{step:08d}.png')
    files.save_image(path, g)
    writer.write_images(step, {'samples': g[None]})
    return path
