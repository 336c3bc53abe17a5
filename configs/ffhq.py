"""FFHQ 256 px, unconditional: SRDD (markov mask) or the VAR baseline (`:causal`).

  python -m srdd_jax.tools.convert_var --vae vae_ch160v4096z32.pth --out checkpoints/vae_ch160v4096z32
  python -m srdd_jax.main --config=configs/ffhq.py --workdir=DIR --mode=train \
      --config.data.path=/data/ffhq/images1024x1024
  Options after the colon: a preset (d16 d20 d24 d30), a mask (markov causal), e.g. configs/ffhq.py:d20,causal
"""
import ml_collections

from srdd_jax import config as recipe


def get_config(arg=None):
  a = recipe.parse_arg(arg, preset='d16', mask='markov')
  # One class: the model learns class 0 and, through label dropout, the null class that guidance uses.
  c = recipe.base_config(a['preset'], num_classes=1, mask=a['mask'])
  c.tokenizer.checkpoint = 'checkpoints/vae_ch160v4096z32'
  # FFHQ ships as a flat tree of PNGs (70,000); faces are aligned, so flips are the only augmentation
  # that keeps them faces.
  c.data = ml_collections.ConfigDict(dict(
      source='folder', path='data/ffhq', labels='none', resize_ratio=1.125, random_crop=True, flip=True))
  c.sample.classes = '0'
  c.sample.num_per_class = 16
  return recipe.with_defaults(c)  # Every key present, so each can be overridden on the command line.
