"""Convert VAR PyTorch checkpoints to srdd_jax parameters.

  python -m srdd_jax.tools.convert_var --vae vae_ch160v4096z32.pth --out DIR
  python -m srdd_jax.tools.convert_var --var var_d16.pth --out DIR
  python -m srdd_jax.tools.convert_var --manifest checkpoint_manifests.json --manifest_key var_d16

The architecture is read from the state dict itself (tokenizer: ch, ch_mult, blocks, attention,
vocabulary, phi sharing; transformer: depth, width, heads, classes, shared AdaLN, `attn_l2_norm` from
`scale_mul_1H11`, the scale schedule from the length of `pos_1LC`), then every key and shape is
checked strictly. What checkpoints do not store comes from flags: the tokenizer's `patch_nums` and phi
ratio (VAR's 256 px values by default). `--manifest` checks a key -> shape manifest without weights
(through `jax.eval_shape`); a manifest key starting with 'var' is a transformer, otherwise a tokenizer.
"""
from __future__ import annotations

import json
import sys
import time
from argparse import RawDescriptionHelpFormatter

import numpy as np

from srdd_jax import files
from srdd_jax.config import ArgumentParser, ConfigError, ints
from srdd_jax.convert import params_io
from srdd_jax.convert import state_dict as sd
from srdd_jax.convert import var_transformer
from srdd_jax.convert import var_vqvae
from srdd_jax.tokenizer.vqvae import VQVAEConfig, count_params


def _manifest_shapes(path: str, key: str) -> dict:
  """{state dict key: shape} of entry `key` of a manifest file; ConfigError saying what is wrong with it."""
  if not files.isfile(path):
    raise ConfigError(f'--manifest {path}: no such file')
  try:
    manifests = json.loads(files.read_text(path))
  except (ValueError, UnicodeDecodeError) as e:
    raise ConfigError(f'--manifest {path}: not a JSON manifest ({type(e).__name__}: {e})') from None
  if not isinstance(manifests, dict):
    raise ConfigError(f'--manifest {path}: expected {{name: {{key: shape}}}}, got a {type(manifests).__name__}')
  if key not in manifests:
    raise ConfigError(f'{path} has no entry {key!r}; it has {sorted(manifests)}')
  entry = manifests[key]
  if not isinstance(entry, dict) or not all(isinstance(v, list) and all(isinstance(n, int) for n in v)
                                            for v in entry.values()):
    raise ConfigError(f'--manifest {path}: entry {key!r} must map state dict keys to shapes (lists of integers)')
  return {k: tuple(v) for k, v in entry.items()}


def main(argv=None) -> int:
  ap = ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=RawDescriptionHelpFormatter,
                      epilog=__doc__)
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument('--vae', help='VAR VQ-VAE state dict: .pth (needs torch) or .npz')
  src.add_argument('--var', help='VAR transformer state dict: .pth (needs torch) or .npz')
  src.add_argument('--manifest', help='JSON file of {name: {key: shape}} to check without weights')
  ap.add_argument('--manifest_key', default='vae_ch160v4096z32', help='entry of --manifest to check')
  ap.add_argument('--prefix', default='', help="only keys starting with this prefix, stripped (e.g. 'vae/')")
  ap.add_argument('--out', help='output directory for the converted parameters')
  ap.add_argument('--overwrite', action='store_true', help='replace parameters already in --out')
  ap.add_argument('--patch_nums', default=None,
                  help='scales (tokenizer default: VAR 256 px; transformer: from pos_1LC)')
  ap.add_argument('--quant_resi', type=float, default=0.5, help='phi ratio (not stored in checkpoints)')
  ap.add_argument('--num_heads', type=int, default=0,
                  help='transformer heads when the checkpoint has no scale_mul_1H11 (default width/64)')
  args = ap.parse_args(argv)
  try:
    args.patch_nums = ints(args.patch_nums, '--patch_nums') if args.patch_nums else None
  except ConfigError as e:
    ap.error(str(e))

  if args.manifest:
    try:
      shapes = _manifest_shapes(args.manifest, args.manifest_key)
    except ConfigError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    if args.prefix:
      shapes = {k[len(args.prefix):]: v for k, v in shapes.items() if k.startswith(args.prefix)}
    kind = 'var' if args.manifest_key.startswith('var') else 'vqvae'
    state, source = None, None
  else:
    if not args.out:
      print('error: --out is required with --vae/--var', file=sys.stderr)
      return 2
    kind, source = ('vqvae', args.vae) if args.vae else ('var', args.var)
    t0 = time.time()
    try:
      state = sd.load_state_dict(source, prefix=args.prefix)
    except (FileNotFoundError, ImportError, sd.StateDictMismatch) as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    shapes = {k: np.shape(v) for k, v in state.items()}
    print(f'read {len(state)} entries from {source} in {time.time() - t0:.1f}s', flush=True)

  try:
    if kind == 'vqvae':
      config = var_vqvae.infer_vqvae_config(shapes, patch_nums=args.patch_nums or VQVAEConfig.patch_nums,
                                  quant_resi=args.quant_resi)
      km = var_vqvae.map_vqvae(shapes, config)
      abstract = var_vqvae.unbox(var_vqvae.abstract_params(config))
      buffers = var_vqvae.VQVAE_BUFFERS
    else:
      config = var_transformer.infer_var_config(shapes, patch_nums=args.patch_nums,
                                                num_heads=args.num_heads)
      km = var_transformer.map_var(shapes, config)
      abstract = var_transformer.abstract_params(config)
      buffers = var_transformer.VAR_BUFFERS
  except (sd.StateDictMismatch, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'{kind} config: {config}')
  print(f'mapped {len(km.targets)} keys, dropped {len(km.dropped)} buffer(s); {len(shapes)} keys in '
        f'all; {count_params(abstract):,} parameters', flush=True)
  if state is None:
    return 0
  try:
    params = sd.convert_state_dict(state, abstract, drop=buffers, what=f'{kind} state dict')
  except (sd.StateDictMismatch, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  try:
    out = params_io.save_params(args.out, params, kind=kind, config=config, source=source,
                                overwrite=args.overwrite)
  except FileExistsError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'saved to {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
