"""MiniImageNet 256 px, 100 classes from an image folder: SRDD (markov) or the VAR baseline (`:causal`).

  python -m srdd_jax.main --config=configs/miniimagenet.py --workdir=DIR --mode=train \
      --config.data.path=/data/mini-imagenet/train    # one sub-folder per class (n01532829/ ...)
  Options after the colon: a preset (d16 d20 d24 d30), a mask (markov causal).
"""
import ml_collections

from srdd_jax import config as recipe


def get_config(arg=None):
  a = recipe.parse_arg(arg, preset='d16', mask='markov')
  c = recipe.base_config(a['preset'], num_classes=100, mask=a['mask'])
  c.tokenizer.checkpoint = 'checkpoints/vae_ch160v4096z32'
  c.data = ml_collections.ConfigDict(dict(
      source='folder', path='data/miniimagenet/train', labels='subfolder', resize_ratio=1.125,
      random_crop=True, flip=True))
  c.sample.classes = '0,10,20,30,40,50,60,70'
  return recipe.with_defaults(c)  # Every key present, so each can be overridden on the command line.
