"""`--mode=tokenize`: a data set's token ids under the frozen tokenizer, written as a token cache
(srdd_jax/data/token_cache.py) that `--mode=train` reads with `config.data.token_cache=DIR`."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from srdd_jax import files
from srdd_jax.config import ConfigError, with_defaults
from srdd_jax.convert.loading import tokenizer_for_model
from srdd_jax.data import pipeline, token_cache
from srdd_jax.data import preprocess as pp
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import multihost
from srdd_jax.tokenizer.api import Tokenizer


def check(config) -> None:
  """config.tokenize's values (before anything is loaded)."""
  tk = config.tokenize
  bs = int(tk.batch_size)
  if bs < 1 or bs % jax.local_device_count():
    raise ConfigError(f'config.tokenize.batch_size={bs} must be a positive multiple of the '
                      f'{jax.local_device_count()} local devices')
  if int(tk.shard_size) < 1:
    raise ConfigError(f'config.tokenize.shard_size={tk.shard_size} must be >= 1')
  if int(tk.max_examples) < 0:
    raise ConfigError(f'config.tokenize.max_examples={tk.max_examples} must be >= 0 (0 = every example)')


def run(config, workdir: str) -> dict:
  config = with_defaults(config)
  tk = config.tokenize
  out_dir = tk.out_dir or files.join(workdir, 'tokens')
  check(config)
  bs = int(tk.batch_size)
  tok = tokenizer_for_model(config)  # The cache is for the model's scales.
  vq = tok.config
  data = {k: v for k, v in config.data.to_dict().items() if k != 'token_cache'}
  data['split'] = tk.split or data.get('split') or 'train'
  # The cache holds the center crop (and its mirror image): random crops would be frozen into it.
  data.update(random_crop=False, flip=False)
  if data.get('source') == 'synthetic' and data.get('num_classes') is None:
    data['num_classes'] = int(config.model.num_classes)
  source = pipeline.build_source(data, vq.image_size, train=False)
  vae_params = tok.params  # A fresh tokenizer is initialised only now that the inputs work.
  # Each process encodes on its own devices; shards are split between processes.
  mesh = pm.make_mesh((-1, 1, 1), devices=jax.local_devices())
  sharding = NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))
  local_params = jax.device_put(vae_params, pm.replicated(mesh))
  tokenizer = Tokenizer(vq)
  # Pixels go to the devices as decoded (uint8) and are normalised there.
  encode_jit = jax.jit(lambda p, x: jnp.concatenate(tokenizer.img_to_idx(p, pp.to_model_range(x)), axis=1))

  def encode(images):
    return encode_jit(local_params, jax.device_put(np.asarray(images), sharding))

  identity = tok.identity()  # Its architecture and weights: what a cache is checked against when read.
  tokenizer_hash = identity['hash']
  logging.info('tokenizing %s with tokenizer %s (hash %s) into %s', source.description,
               config.tokenizer.checkpoint or '(random)', tokenizer_hash[:12], out_dir)
  t0 = time.time()
  try:
    stats = token_cache.write(
        out_dir, source, encode, tokenizer_hash=tokenizer_hash,
        tokenizer_checkpoint=files.absolute(config.tokenizer.checkpoint) if config.tokenizer.checkpoint else '',
        patch_nums=vq.patch_nums, vocab_size=vq.vocab_size, flips=bool(tk.flips), batch_size=bs,
        shard_size=int(tk.shard_size), process_index=jax.process_index(), process_count=jax.process_count(),
        sync=multihost.sync, max_examples=int(tk.max_examples), tokenizer=identity)
  except pipeline.DataError as e:
    raise pipeline.DataError(f'config.tokenize: {e}') from e
  summary = {'out_dir': out_dir, **stats, 'wall_seconds': round(time.time() - t0, 2),
             'skipped_examples': int(source.skipped)}
  if multihost.is_main_process():
    logging.info('tokenize done: %s', summary)
  return summary
