"""`--mode=tokenize`: a data set's token ids under the frozen tokenizer, written as a token cache
(srdd_jax/data/token_cache.py) that `--mode=train` reads with `config.data.token_cache=DIR`."""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from srdd_jax.data import token_cache
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import multihost
from srdd_jax.tokenizer.api import Tokenizer
from srdd_jax.train import recipe
from srdd_jax.train.loop import TrainConfigError, _tokenizer


def _sync(name):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def run_tokenize(config, workdir: str) -> dict:
  config = recipe.with_defaults(config)
  tk = config.tokenize
  out_dir = tk.out_dir or os.path.join(workdir, 'tokens')
  vq, vae_params = _tokenizer(config)
  pn = tuple(config.model.patch_nums)
  if pn[-1] != vq.latent_side:
    raise TrainConfigError(f'config.model.patch_nums={pn} must end at the tokenizer latent side {vq.latent_side}')
  vq = dataclasses.replace(vq, patch_nums=pn)  # The cache is for the model's scales.
  from srdd_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  data = {k: v for k, v in config.data.to_dict().items() if k != 'token_cache'}
  data['split'] = tk.split or data.get('split') or 'train'
  # The cache holds the center crop (and its mirror image): random crops would be frozen into it.
  data.update(random_crop=False, flip=False)
  if data.get('source') == 'synthetic':
    data.setdefault('num_classes', int(config.model.num_classes))
  try:
    source = pipeline.build_source(data, vq.image_size, train=False)
  except pipeline.DataError as e:
    raise TrainConfigError(str(e)) from e
  # Each process encodes on its own devices; shards are split between processes.
  mesh = pm.make_mesh((-1, 1, 1), devices=jax.local_devices())
  bs = int(tk.batch_size)
  if bs < 1 or bs % jax.local_device_count():
    raise TrainConfigError(f'config.tokenize.batch_size={bs} must be a positive multiple of the '
                           f'{jax.local_device_count()} local devices')
  if int(tk.shard_size) < 1:
    raise TrainConfigError(f'config.tokenize.shard_size={tk.shard_size} must be >= 1')
  sharding = NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))
  local_params = jax.device_put(vae_params, pm.replicated(mesh))
  tokenizer = Tokenizer(vq)
  encode_jit = jax.jit(lambda p, x: jnp.concatenate(tokenizer.img_to_idx(p, x), axis=1))

  def encode(images):
    return encode_jit(local_params, jax.device_put(np.asarray(images, np.float32), sharding))

  tokenizer_hash = token_cache.params_hash(vae_params)
  logging.info('tokenizing %s with tokenizer %s (hash %s) into %s', source.description,
               config.tokenizer.checkpoint or '(random)', tokenizer_hash[:12], out_dir)
  t0 = time.time()
  try:
    stats = token_cache.write(
        out_dir, source, encode, tokenizer_hash=tokenizer_hash,
        tokenizer_checkpoint=os.path.abspath(config.tokenizer.checkpoint) if config.tokenizer.checkpoint else '',
        patch_nums=vq.patch_nums, vocab_size=vq.vocab_size, flips=bool(tk.flips), batch_size=bs,
        shard_size=int(tk.shard_size), process_index=jax.process_index(), process_count=jax.process_count(),
        sync=_sync)
  except pipeline.DataError as e:
    raise TrainConfigError(f'config.tokenize: {e}') from e
  summary = {'out_dir': out_dir, **stats, 'wall_seconds': round(time.time() - t0, 2),
             'skipped_examples': int(source.skipped)}
  if multihost.is_main_process():
    logging.info('tokenize done: %s', summary)
  return summary
