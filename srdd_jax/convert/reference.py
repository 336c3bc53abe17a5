"""The reference-vector file format (../shared/reference/README.md): a `meta` JSON entry that describes
the architecture, PyTorch state-dict entries under `vae/`, `var/` or `inception/`, and outputs.

Reading the architecture from `meta` is a checkpoint-format question, so it lives here; the checks
themselves are `python -m srdd_jax.tools.check_reference`.
"""
from __future__ import annotations

import json

from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.transformer.config import VARConfig


class ReferenceFormatError(ValueError):
  """The file is not in the reference format (missing `meta`, missing entries, bad meta values)."""


def read_meta(z, path) -> dict:
  if 'meta' not in z.files:
    raise ReferenceFormatError(f'{path}: no `meta` entry; not a reference file')
  try:
    meta = json.loads(str(z['meta']))
  except json.JSONDecodeError as e:
    raise ReferenceFormatError(f'{path}: `meta` is not valid JSON ({e})') from e
  if not isinstance(meta, dict) or 'kind' not in meta:
    raise ReferenceFormatError(f'{path}: `meta` has no `kind`')
  return meta


def meta_get(meta, key, path, default=None, required=True):
  if key in meta:
    return meta[key]
  if required and default is None:
    raise ReferenceFormatError(f'{path}: meta has no `{key}`')
  return default


_OPTIONAL_FIELDS = ('num_res_blocks', 'using_sa', 'using_mid_sa', 'default_qresi_counts', 'in_channels')


def vqvae_config_from_meta(meta: dict, path: str) -> VQVAEConfig:
  kw = dict(
      vocab_size=int(meta_get(meta, 'V', path)),
      z_channels=int(meta_get(meta, 'Cvae', path)),
      ch=int(meta_get(meta, 'ch', path)),
      ch_mult=tuple(meta_get(meta, 'ch_mult', path)),
      patch_nums=tuple(meta_get(meta, 'patch_nums', path)),
      share_quant_resi=int(meta_get(meta, 'share_quant_resi', path)),
      quant_resi=float(meta_get(meta, 'quant_resi', path)),
  )
  for k in _OPTIONAL_FIELDS:
    if k in meta:
      kw[k] = meta[k]
  try:
    config = VQVAEConfig(**kw)
  except ValueError as e:
    raise ReferenceFormatError(f'{path}: meta describes an invalid tokenizer: {e}') from e
  size = meta.get('image_size')
  if size is not None and int(size) != config.image_size:
    raise ReferenceFormatError(
        f'{path}: meta image_size={size} but patch_nums[-1]={config.latent_side} x downsampling '
        f'{config.downsample} = {config.image_size}')
  return config


def var_config_from_meta(meta: dict, state_shapes, path: str) -> VARConfig:
  """The architecture from `meta`; what meta leaves out (vocabulary, Cvae, MLP ratio) from the weights."""
  kw = dict(
      depth=int(meta_get(meta, 'depth', path)),
      width=int(meta_get(meta, 'width', path)),
      num_heads=int(meta_get(meta, 'heads', path)),
      num_classes=int(meta_get(meta, 'num_classes', path)),
      attn_l2_norm=bool(meta_get(meta, 'attn_l2_norm', path)),
      shared_aln=bool(meta_get(meta, 'shared_aln', path)),
      patch_nums=tuple(meta_get(meta, 'patch_nums', path)),
      # The reference forward is deterministic: no label or path dropout.
      cond_drop_rate=0.0, drop_path_rate=0.0, dtype='float32',
  )
  for key, field in (('V', 'vocab_size'), ('Cvae', 'z_channels'), ('mlp_ratio', 'mlp_ratio'),
                     ('norm_eps', 'norm_eps')):
    if key in meta:
      kw[field] = meta[key]
  if 'head.weight' in state_shapes and 'vocab_size' not in kw:
    kw['vocab_size'] = int(state_shapes['head.weight'][0])
  if 'word_embed.weight' in state_shapes and 'z_channels' not in kw:
    kw['z_channels'] = int(state_shapes['word_embed.weight'][1])
  if 'blocks.0.ffn.fc1.weight' in state_shapes and 'mlp_ratio' not in kw:
    kw['mlp_ratio'] = state_shapes['blocks.0.ffn.fc1.weight'][0] / kw['width']
  try:
    return VARConfig(**kw)
  except ValueError as e:
    raise ReferenceFormatError(f'{path}: meta describes an invalid transformer: {e}') from e
