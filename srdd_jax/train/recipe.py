"""The training recipe (SPEC §8) and the one place that lists every key of a training config.

`configs/<dataset>.py` start from `base_config(preset, ...)` and change what their data set needs; the
loop reads configs through `with_defaults`, so an older or hand-written config gets the same defaults.
"""
from __future__ import annotations

import ml_collections

from srdd_jax.transformer.config import PATCH_NUMS_256, PATCH_NUMS_512

# VAR's recipes per model size: global batch, epochs, base LR (per 256 examples), final LR fraction
# and the weight decay at the end of training (-1 = constant). d36 (512 px) has no published recipe
# here; it takes d30's.
RECIPES = {
    'd16': dict(global_batch=768, epochs=200, base_lr=1e-4, final_fraction=0.1, weight_decay_end=-1.0),
    'd20': dict(global_batch=768, epochs=250, base_lr=1e-4, final_fraction=0.1, weight_decay_end=-1.0),
    'd24': dict(global_batch=768, epochs=350, base_lr=8e-5, final_fraction=0.01, weight_decay_end=-1.0),
    'd30': dict(global_batch=1024, epochs=350, base_lr=8e-5, final_fraction=0.01, weight_decay_end=0.08),
    'd36': dict(global_batch=1024, epochs=350, base_lr=8e-5, final_fraction=0.01, weight_decay_end=0.08),
}


def _defaults() -> dict:
  """Every key the training loop reads, with the value it takes when a config leaves it out."""
  return {
      'seed': 0,
      'tokenizer': dict(
          checkpoint='',  # Directory written by `convert_var --vae` (or the tokenizer trainer).
          allow_random=False,  # True: no checkpoint -> a freshly initialised tokenizer (smoke runs only).
          vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4)),  # Used only when random.
      'model': dict(
          preset='',  # d16 | d20 | d24 | d30 | d36, or '' and depth/width/heads below.
          depth=0, width=0, heads=0,  # 0 = from the preset (width 64*depth, heads = depth).
          num_classes=1000, patch_nums=PATCH_NUMS_256, mask='markov', dtype='bfloat16',
          cond_drop_rate=0.1, drop_path_rate=-1.0),
      # The keys of the input pipeline (srdd_jax/data/pipeline.py), plus `token_cache`: a directory
      # written by --mode=tokenize, read instead of encoding images at every step ('' = encode).
      'data': dict(source='synthetic', num_examples=1024, token_cache=''),
      'tokenize': dict(
          out_dir='',  # '' = WORKDIR/tokens.
          split='',  # '' = config.data.split, else 'train'.
          flips=False,  # Also cache the mirror image; training then picks one copy per example.
          batch_size=64, shard_size=4096),
      'train': dict(
          global_batch=768, epochs=0.0, steps=0,  # steps > 0 wins; else epochs * examples / batch.
          accum_steps=1, ema_decay=0.0, log_every=100, checkpoint_every=1000, keep_checkpoints=3,
          sample_every=0,  # Steps between sample grids (0 = never); samples/step_<n>.png + TensorBoard.
          progressive_start_scales=0,  # > 0: train the first n scales first, growing to all ...
          progressive_steps=0),  # ... linearly over this many steps.
      'optim': dict(
          base_lr=1e-4,  # Per 256 examples: peak LR = base_lr * global_batch / 256.
          weight_decay=0.05, weight_decay_end=-1.0,
          warmup_steps=-1,  # -1 = VAR's: a fiftieth of training.
          final_fraction=0.1, clip_norm=2.0),
      'sampler': dict(cfg=5.0, cfg_schedule='linear', temperature=1.0, top_k=900, top_p=0.96, greedy=False,
                      mr_threshold=0.01, mr_iterations=10, mr_scales=''),
      'sample': dict(classes='', num_per_class=4),  # The grids written during training.
      'mesh': {'data': -1, 'fsdp': 1, 'tensor': 1},
      'mesh_rules': (),  # ((logical axis, mesh axis or axes), ...); () = srdd_jax.parallel.mesh.DEFAULT_RULES.
  }


def with_defaults(config) -> ml_collections.ConfigDict:
  """A copy of `config` with every missing key filled from the defaults (given values win). `data`
  and `mesh` are taken whole when given: their keys depend on the source and the axes chosen."""
  merged = _defaults()
  given = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  for section, value in given.items():
    if isinstance(value, dict) and isinstance(merged.get(section), dict) and section not in ('data', 'mesh'):
      merged[section] = {**merged[section], **value}
    else:
      merged[section] = value
  return ml_collections.ConfigDict(merged)


def base_config(preset: str, *, num_classes: int, resolution: int = 256, mask: str = 'markov'):
  """A full training config for a VAR model size with SPEC §8's recipe, before data set choices."""
  if preset not in RECIPES:
    raise ValueError(f'unknown preset {preset!r}; known: {sorted(RECIPES)}')
  r = RECIPES[preset]
  c = ml_collections.ConfigDict(_defaults())
  c.model.preset = preset
  c.model.num_classes = num_classes
  c.model.mask = mask
  c.model.patch_nums = PATCH_NUMS_512 if resolution == 512 else PATCH_NUMS_256
  c.train.global_batch = r['global_batch']
  c.train.epochs = float(r['epochs'])
  c.train.log_every = 100
  c.train.checkpoint_every = 2000
  c.train.sample_every = 5000
  c.optim.base_lr = r['base_lr']
  c.optim.final_fraction = r['final_fraction']
  c.optim.weight_decay_end = r['weight_decay_end']
  # TPU pod: data parallel across hosts, parameters and optimizer state sharded 8 ways (fsdp) so d30
  # fits in 16 GB HBM; tensor parallelism is off until widths reach several thousand.
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 8, 'tensor': 1})
  return c


def parse_arg(arg: str | None, **defaults) -> dict:
  """`--config=configs/x.py:d20,causal,source=folder` -> {'preset': 'd20', 'mask': 'causal', ...}.

  Bare words are a preset (d16...) or a mask (markov, causal); `key=value` sets anything else the
  config file accepts. Unknown keys are an error naming them.
  """
  out = dict(defaults)
  for part in (arg or '').split(','):
    part = part.strip()
    if not part:
      continue
    if '=' in part:
      k, v = part.split('=', 1)
    elif part in RECIPES:
      k, v = 'preset', part
    elif part in ('markov', 'causal'):
      k, v = 'mask', part
    else:
      raise ValueError(f'config argument {part!r}: expected a preset {sorted(RECIPES)}, a mask '
                       f'(markov, causal) or key=value with a key in {sorted(defaults)}')
    if k not in defaults:
      raise ValueError(f'config argument {k!r} is not one of {sorted(defaults)}')
    out[k] = type(defaults[k])(v) if defaults[k] is not None else v
  return out
