"""ImageNet 256 px, 1000 classes: SRDD (markov mask) or the VAR baseline (`:causal`), from TFDS
`imagenet2012` (manual download) or, with `:source=folder`, an ImageNet train folder.

  python -m srdd_jax.main --config=configs/imagenet.py --workdir=DIR --mode=train \
      --config.data.data_dir=/data/tensorflow_datasets
  python -m srdd_jax.main --config=configs/imagenet.py:d30,source=folder --workdir=DIR --mode=train \
      --config.data.path=/data/imagenet/train
"""
import ml_collections

from srdd_jax import config as recipe


def get_config(arg=None):
  a = recipe.parse_arg(arg, preset='d16', mask='markov', source='tfds')
  c = recipe.base_config(a['preset'], num_classes=1000, mask=a['mask'])
  c.tokenizer.checkpoint = 'checkpoints/vae_ch160v4096z32'
  common = dict(resize_ratio=1.125, random_crop=True, flip=True)
  if a['source'] == 'tfds':
    c.data = ml_collections.ConfigDict(dict(
        source='tfds', name='imagenet2012', split='train', data_dir='data/tensorflow_datasets', download=False,
        **common))
  elif a['source'] == 'folder':
    c.data = ml_collections.ConfigDict(dict(
        source='folder', path='data/imagenet/train', labels='subfolder', **common))
  else:
    raise ValueError(f"configs/imagenet.py: source={a['source']!r} must be 'tfds' or 'folder'")
  c.sample.classes = '1,88,207,279,360,387,417,980'  # Goldfish, macaw, golden retriever, ... for the grids.
  return recipe.with_defaults(c)  # Every key present, so each can be overridden on the command line.
