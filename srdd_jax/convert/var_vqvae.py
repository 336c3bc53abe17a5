"""VAR's VQ-VAE (`vae_ch160v4096z32.pth`) -> Flax parameters of `srdd_jax.tokenizer`."""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import flax.linen as nn
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


def infer_vqvae_config(shapes, patch_nums=VQVAEConfig.patch_nums, quant_resi=0.5) -> VQVAEConfig:
  """Reads the architecture of a VAR VQ-VAE from its state-dict keys and shapes."""
  def need(key):
    if key not in shapes:
      raise sd.StateDictMismatch(f'not a VAR VQ-VAE state dict: key {key!r} is missing')
    return tuple(shapes[key])

  ch, in_channels = need('encoder.conv_in.weight')[:2]
  vocab, cvae = need('quantize.embedding.weight')
  levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r'encoder\.down\.(\d+)\.', k))})
  if not levels:
    raise sd.StateDictMismatch('not a VAR VQ-VAE state dict: no encoder.down.* keys')
  ch_mult = tuple(need(f'encoder.down.{i}.block.0.conv1.weight')[0] // ch for i in levels)
  blocks = {int(m.group(1)) for k in shapes if (m := re.match(r'encoder\.down\.0\.block\.(\d+)\.', k))}
  qresi = [k for k in shapes if k.startswith('quantize.quant_resi.') and k.endswith('.weight')]
  if not qresi:
    share, counts, ratio = 1, 0, 0.0
  elif any('.qresi.' in k for k in qresi):
    share, counts, ratio = 1, 0, quant_resi
  elif any('.qresi_ls.' in k for k in qresi):
    share, counts, ratio = len(qresi), 0, quant_resi
  else:
    share, ratio = 0, quant_resi
    counts = 0 if len(qresi) == len(patch_nums) else len(qresi)
  return VQVAEConfig(
      vocab_size=int(vocab), z_channels=int(cvae), ch=int(ch), ch_mult=ch_mult,
      num_res_blocks=len(blocks), in_channels=int(in_channels),
      using_sa=f'encoder.down.{levels[-1]}.attn.0.qkv.weight' in shapes,
      using_mid_sa='encoder.mid.attn_1.qkv.weight' in shapes,
      patch_nums=tuple(patch_nums), share_quant_resi=share, default_qresi_counts=counts,
      quant_resi=ratio)
