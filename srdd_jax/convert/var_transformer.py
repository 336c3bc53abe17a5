"""VAR transformer checkpoints (`var_d16.pth` ... `var_d30.pth`, d36 with shared AdaLN) -> Flax params."""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from srdd_jax.convert import state_dict as sd
from srdd_jax.transformer.config import PATCH_NUMS_256, PATCH_NUMS_512, VARConfig
from srdd_jax.transformer.model import VAR, blocks_layout

# Buffers of the PyTorch module, not parameters: the level ids, the dense training mask, the zero k bias.
VAR_BUFFERS = (r'lvl_1L', r'attn_bias_for_masking', r'blocks\.\d+\.attn\.zero_k_bias')


def abstract_params(config: VARConfig, batch: int = 1, boxed: bool = False):
  model = VAR(config)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  x_in = jax.ShapeDtypeStruct((batch, config.seq_len - 1, config.z_channels), jnp.float32)
  variables = jax.eval_shape(lambda l, x: model.init(jax.random.PRNGKey(0), l, x), labels, x_in)
  return variables['params'] if boxed else nn.meta.unbox(variables['params'])


def _per_block(config: VARConfig) -> VARConfig:
  # State dicts name each block (`blocks.3.attn...`): they map onto the per-block layout, which is
  # stacked afterwards when the config scans its blocks.
  return dataclasses.replace(config, scan_blocks=False)


def map_var(state_shapes: Mapping[str, Any], config: VARConfig) -> sd.KeyMap:
  return sd.map_state_dict(state_shapes, abstract_params(_per_block(config)), drop=VAR_BUFFERS,
                           what='VAR transformer state dict')


def convert_var(source: str | os.PathLike | Mapping[str, Any], config: VARConfig, prefix: str = ''):
  """A VAR state dict -> params in the layout of `config` (stacked blocks when config.scan_blocks)."""
  state = sd.load_state_dict(source, prefix=prefix)
  params = sd.convert_state_dict(state, abstract_params(_per_block(config)), drop=VAR_BUFFERS,
                                 what='VAR transformer state dict')
  return blocks_layout(params, config)


def infer_var_config(shapes: Mapping[str, Any], patch_nums=None, num_heads: int = 0,
                     **overrides) -> VARConfig:
  """Reads a VAR transformer's architecture from its state-dict keys and shapes.

  `attn_l2_norm` is decided by the presence of `scale_mul_1H11` (which also gives the number of
  heads); without it the heads default to width / 64 unless `num_heads` is given. `patch_nums` follows
  from the length of `pos_1LC` for VAR's 256 and 512 px schedules, otherwise it must be given.
  """
  def need(key):
    if key not in shapes:
      raise sd.StateDictMismatch(f'not a VAR transformer state dict: key {key!r} is missing')
    return tuple(shapes[key])

  width, cvae = need('word_embed.weight')
  depth = len({int(m.group(1)) for k in shapes if (m := re.match(r'blocks\.(\d+)\.', k))})
  if depth == 0:
    raise sd.StateDictMismatch('not a VAR transformer state dict: no blocks.* keys')
  seq_len = need('pos_1LC')[1]
  if patch_nums is None:
    known = {sum(p * p for p in pn): pn for pn in (PATCH_NUMS_256, PATCH_NUMS_512)}
    if seq_len not in known:
      raise ValueError(f'pos_1LC has {seq_len} positions, which is not one of VAR\'s schedules '
                       f'{sorted(known)}; pass patch_nums')
    patch_nums = known[seq_len]
  l2 = 'blocks.0.attn.scale_mul_1H11' in shapes
  heads = need('blocks.0.attn.scale_mul_1H11')[1] if l2 else (num_heads or width // 64)
  kw = dict(depth=depth, width=width, num_heads=heads, z_channels=cvae,
            num_classes=need('class_emb.weight')[0] - 1, vocab_size=need('head.weight')[0],
            mlp_ratio=need('blocks.0.ffn.fc1.weight')[0] / width, patch_nums=tuple(patch_nums),
            shared_aln='shared_ada_lin.1.weight' in shapes, attn_l2_norm=l2,
            mask='causal')  # VAR's checkpoints were trained with the causal mask.
  kw.update(overrides)
  return VARConfig(**kw)
