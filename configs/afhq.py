"""AFHQ 256 px, 3 classes (cat, dog, wild): SRDD (markov mask) or the VAR baseline (`:causal`).

  python -m srdd_jax.main --config=configs/afhq.py --workdir=DIR --mode=train \
      --config.data.path=/data/afhq/train      # sub-folders cat/ dog/ wild/
  Options after the colon: a preset (d16 d20 d24 d30), a mask (markov causal).
"""
import ml_collections

from srdd_jax import config as recipe


def get_config(arg=None):
  a = recipe.parse_arg(arg, preset='d16', mask='markov')
  c = recipe.base_config(a['preset'], num_classes=3, mask=a['mask'])
  c.tokenizer.checkpoint = 'checkpoints/vae_ch160v4096z32'
  # AFHQ images are 512x512; class ids follow the sorted sub-folder names: cat 0, dog 1, wild 2.
  c.data = ml_collections.ConfigDict(dict(
      source='folder', path='data/afhq/train', labels='subfolder', resize_ratio=1.125, random_crop=True,
      flip=True))
  c.sample.num_per_class = 8
  return recipe.with_defaults(c)  # Every key present, so each can be overridden on the command line.
