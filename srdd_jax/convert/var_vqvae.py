"""VAR's VQ-VAE (`vae_ch160v4096z32.pth`) -> Flax parameters of `srdd_jax.tokenizer`."""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from srdd_jax.convert import state_dict as sd
from srdd_jax.tokenizer.vqvae import VQVAE, VQVAEConfig

# Buffers a released checkpoint carries that are not parameters of the function.
VQVAE_BUFFERS = (r'quantize\.ema_vocab_hit_SV',)  # Regular expressions.


def abstract_params(config: VQVAEConfig, batch: int = 1):
  """Parameter shapes of the tokenizer, without allocating weights."""
  model = VQVAE(config)
  side = config.image_size
  x = jax.ShapeDtypeStruct((batch, side, side, config.in_channels), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  return variables['params']


def unbox(tree):
  """Drops the logical-partitioning boxes, leaving plain arrays (or shape structs)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  return nn.meta.unbox(tree)


def map_vqvae(state_shapes: Mapping[str, Any], config: VQVAEConfig) -> sd.KeyMap:
  """Checks every key and shape of a VAR VQ-VAE state dict against the model; raises on mismatch."""
  return sd.map_state_dict(state_shapes, unbox(abstract_params(config)), drop=VQVAE_BUFFERS,
                           what='VQ-VAE state dict')


def convert_vqvae(source: str | os.PathLike | Mapping[str, Any], config: VQVAEConfig,
                  prefix: str = ''):
  """Converts a VAR VQ-VAE state dict (`.pth`, `.npz` or a mapping) to Flax params (float32)."""
  state = sd.load_state_dict(source, prefix=prefix)
  return sd.convert_state_dict(state, unbox(abstract_params(config)), drop=VQVAE_BUFFERS,
                               what='VQ-VAE state dict')
