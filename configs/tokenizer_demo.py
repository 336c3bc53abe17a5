"""Tokenizer demo: image -> multi-scale tokens -> image with VAR's VQ-VAE architecture.

  python -m srdd_jax.main --config=configs/tokenizer_demo.py --workdir=workdir/demo --mode=reconstruct

Weights come from `tokenizer.checkpoint` (a directory written by `srdd_jax.tools.convert_var`) or,
when that is empty, from the reference file `tokenizer.reference_npz` (VAR's code with random weights,
ch=32), found through $SRDD_REFERENCE_DIR (default ../shared/reference). With neither, the demo runs
on freshly initialised weights and says so: its reconstructions are then not meaningful.
"""
import os

import ml_collections

from srdd_jax.config import with_defaults


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.checkpoint = ''  # Converted VQ-VAE directory; takes precedence.
  c.tokenizer.reference_npz = os.path.join(
      os.environ.get('SRDD_REFERENCE_DIR', '../shared/reference'), 'vqvae_ch32_256.npz')
  # Architecture used when the weights come from neither source (fresh init).
  c.tokenizer.vocab_size = 4096
  c.tokenizer.z_channels = 32
  c.tokenizer.ch = 32
  c.tokenizer.ch_mult = (1, 1, 2, 2, 4)
  c.tokenizer.share_quant_resi = 4
  c.tokenizer.precision = 'highest'
  c.model = ml_collections.ConfigDict()
  c.model.patch_nums = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  c.reconstruct = ml_collections.ConfigDict()
  c.reconstruct.num_images = 4  # Synthetic images, used when the reference file supplies none.
  c.reconstruct.batch_size = 2
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  return with_defaults(c)  # Every key present, so each can be overridden on the command line.
