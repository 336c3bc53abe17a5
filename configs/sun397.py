"""SUN397 256 px, 397 scene classes from TFDS: SRDD (markov mask) or the VAR baseline (`:causal`).

  python -m srdd_jax.main --config=configs/sun397.py --workdir=DIR --mode=train \
      --config.data.data_dir=/data/tensorflow_datasets   # prepared with `tfds build sun397`
  Options after the colon: a preset (d16 d20 d24 d30), a mask (markov causal).
"""
import ml_collections

from srdd_jax import config as recipe


def get_config(arg=None):
  a = recipe.parse_arg(arg, preset='d16', mask='markov')
  c = recipe.base_config(a['preset'], num_classes=397, mask=a['mask'])
  c.tokenizer.checkpoint = 'checkpoints/vae_ch160v4096z32'
  # TFDS's standard-part-1 config has the train/validation/test splits of the SUN397 benchmark.
  c.data = ml_collections.ConfigDict(dict(
      source='tfds', name='sun397/standard-part1-120k', split='train', data_dir='data/tensorflow_datasets',
      download=False, resize_ratio=1.125, random_crop=True, flip=True))
  c.sample.classes = '0,50,100,150,200,250,300,350'
  return recipe.with_defaults(c)  # Every key present, so each can be overridden on the command line.
