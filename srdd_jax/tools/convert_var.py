"""Convert VAR PyTorch checkpoints to srdd_jax parameters.

  python -m srdd_jax.tools.convert_var --vae vae_ch160v4096z32.pth --out DIR
  python -m srdd_jax.tools.convert_var --manifest checkpoint_manifests.json --manifest_key vae_ch160v4096z32

The tokenizer's architecture (ch, ch_mult, blocks, attention, vocabulary, phi sharing) is read from the
state dict itself and every key and shape is then checked strictly; `patch_nums` and the phi ratio are
not stored in VAR checkpoints and come from the flags (VAR's 256 px values by default).
`--manifest` checks a key -> shape manifest without any weights (through `jax.eval_shape`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np

from srdd_jax.convert import params_io
from srdd_jax.convert import state_dict as sd
from srdd_jax.convert import var_vqvae
from srdd_jax.tokenizer.vqvae import VQVAEConfig, count_params


def _ints(s: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in s.replace(' ', '').split(',') if x)
  except ValueError as e:
    raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {s!r}') from e


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument('--vae', help='VAR VQ-VAE state dict: .pth (needs torch) or .npz')
  src.add_argument('--manifest', help='JSON file of {name: {key: shape}} to check without weights')
  ap.add_argument('--manifest_key', default='vae_ch160v4096z32', help='entry of --manifest to check')
  ap.add_argument('--prefix', default='', help="only keys starting with this prefix, stripped (e.g. 'vae/')")
  ap.add_argument('--out', help='output directory for the converted parameters')
  ap.add_argument('--overwrite', action='store_true', help='replace parameters already in --out')
  ap.add_argument('--patch_nums', type=_ints, default=VQVAEConfig.patch_nums,
                  help='scales of the tokenizer (not stored in VAR checkpoints)')
  ap.add_argument('--quant_resi', type=float, default=0.5, help='phi ratio (not stored in checkpoints)')
  args = ap.parse_args(argv)

  if args.manifest:
    with open(args.manifest) as f:
      manifests = json.load(f)
    if args.manifest_key not in manifests:
      print(f'error: {args.manifest} has no entry {args.manifest_key!r}; it has {sorted(manifests)}',
            file=sys.stderr)
      return 2
    shapes = {k: tuple(v) for k, v in manifests[args.manifest_key].items()}
    if args.prefix:
      shapes = {k[len(args.prefix):]: v for k, v in shapes.items() if k.startswith(args.prefix)}
  else:
    if not args.out:
      print('error: --out is required with --vae', file=sys.stderr)
      return 2
    t0 = time.time()
    state = sd.load_state_dict(args.vae, prefix=args.prefix)
    shapes = {k: np.shape(v) for k, v in state.items()}
    print(f'read {len(state)} entries from {args.vae} in {time.time() - t0:.1f}s', flush=True)

  try:
    config = infer_vqvae_config(shapes, patch_nums=args.patch_nums, quant_resi=args.quant_resi)
    km = var_vqvae.map_vqvae(shapes, config)
  except (sd.StateDictMismatch, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  abstract = var_vqvae.unbox(var_vqvae.abstract_params(config))
  n = count_params(abstract)
  print(f'tokenizer config: {config}')
  print(f'mapped {len(km.targets)} keys, dropped {len(km.dropped)} buffer(s) {km.dropped}; '
        f'{len(shapes)} keys in all; {n:,} parameters')
  if args.manifest:
    return 0
  params = sd.convert_state_dict(state, abstract, drop=var_vqvae.VQVAE_BUFFERS, what='VQ-VAE state dict')
  try:
    out = params_io.save_params(args.out, params, kind='vqvae', config=config, source=args.vae,
                                overwrite=args.overwrite)
  except FileExistsError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'saved to {out}')
  return 0


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


if __name__ == '__main__':
  sys.exit(main())
