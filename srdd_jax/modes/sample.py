"""`--mode=sample`: class-conditional samples from trained or converted checkpoints, written as PNG
(a grid with a row per class, and one file per image) and as `samples.npz`, all in WORKDIR/samples,
which is replaced whole once the new samples are complete (parallel/workdir.Outputs)."""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from srdd_jax import files
from srdd_jax.config import ConfigError, ints, with_defaults
from srdd_jax.convert.params_io import model_identity
from srdd_jax.data.images import grid
from srdd_jax.diffusion.generate import generate, sampler_from_config, sampling_batch
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import multihost
from srdd_jax.parallel.workdir import Outputs


def counts(config, nc: int) -> tuple[tuple[int, ...], int]:
  """(classes, samples per class) of config.sample for a model of `nc` classes, checked."""
  classes = ints(config.sample.classes, 'config.sample.classes') or tuple(range(nc))
  bad = [k for k in classes if not 0 <= k < nc]
  if bad:
    raise ConfigError(f'config.sample.classes: class id {bad[0]} is out of range for a model with {nc} '
                      f'classes (0..{nc - 1})')
  per = int(config.sample.num_per_class)
  if per < 1:
    raise ConfigError(f'config.sample.num_per_class={per}: must be >= 1')
  if int(config.sample.batch_size) < 1:
    raise ConfigError(f'config.sample.batch_size={config.sample.batch_size}: must be >= 1')
  return classes, per


def run(config, workdir: str, overwrite: bool = False) -> dict:
  config = with_defaults(config)
  sampler, var_params, vae_params = sampler_from_config(config)
  classes, per = counts(config, sampler.var_config.num_classes)
  labels = np.repeat(np.asarray(classes, np.int32), per)
  bs = sampling_batch(int(config.sample.batch_size), len(labels), pm.data_parallel_size(sampler.mesh),
                      'config.sample.batch_size')
  # The inputs are known to work; only now do earlier outputs stand in the way.
  outputs = Outputs(files.join(workdir, 'samples'), 'samples', overwrite)
  if multihost.is_main_process():
    outputs.claim()
  t0 = time.time()
  images = generate(sampler, var_params, vae_params, labels, bs, int(config.seed), key='config.sample.batch_size')
  if not multihost.is_main_process():  # Process 0 writes; every process took part in sampling.
    return {'num_images': int(len(images))}
  out_dir = outputs.begin()
  files.makedirs(files.join(out_dir, 'images'))
  files.save_npz(files.join(out_dir, 'samples.npz'), arr_0=images, arr_1=labels)
  for i, (im, k) in enumerate(zip(images, labels)):
    files.save_image(files.join(out_dir, 'images', f'class{k:04d}_{i:06d}.png'), im)
  files.save_image(files.join(out_dir, 'grid.png'), grid(images, per))
  summary = {'num_images': int(len(images)), 'classes': list(map(int, classes)), 'per_class': per,
             'mask': sampler.mask, 'sampler': dataclasses.asdict(sampler.config),
             # What they were made from: the two models (params_io.model_identity) and the seed.
             'made_from': {'model': model_identity(config.model.checkpoint),
                           'tokenizer': model_identity(config.tokenizer.checkpoint), 'seed': int(config.seed)},
             'seconds': round(time.time() - t0, 2),
             'outputs': ['samples/grid.png (a row per class)', 'samples/images/*.png',
                         'samples/samples.npz (arr_0 uint8 NHWC, arr_1 labels)']}
  files.write_json(files.join(out_dir, 'summary.json'), summary)
  outputs.commit()
  return summary
