"""A seconds-long training run on CPU: tiny tokenizer (fresh weights) and transformer, synthetic data.

  python -m srdd_jax.main --config=configs/smoke.py --workdir=DIR --mode=train
"""
import ml_collections

from srdd_jax.config import with_defaults


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.tokenizer = ml_collections.ConfigDict(dict(
      checkpoint='', allow_random=True, vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2)))
  c.model = ml_collections.ConfigDict(dict(
      depth=2, width=64, heads=2, num_classes=10, patch_nums=(1, 2, 3, 4), mask='markov',
      dtype='bfloat16', cond_drop_rate=0.1, drop_path_rate=0.0))
  c.data = ml_collections.ConfigDict(dict(source='synthetic', num_examples=64))
  c.train = ml_collections.ConfigDict(dict(
      global_batch=16, steps=20, accum_steps=1, ema_decay=0.999, log_every=1, checkpoint_every=5,
      keep_checkpoints=3, sample_every=0, progressive_start_scales=0, progressive_steps=0))
  c.optim = ml_collections.ConfigDict(dict(
      base_lr=1e-2, weight_decay=0.05, weight_decay_end=-1.0, warmup_steps=2, final_fraction=0.1,
      clip_norm=2.0))
  c.sampler = ml_collections.ConfigDict(dict(
      cfg=5.0, cfg_schedule='linear', temperature=1.0, top_k=0, top_p=0.0, greedy=False, mr_threshold=0.01,
      mr_iterations=2, mr_scales=''))
  c.sample = ml_collections.ConfigDict(dict(classes='0,1,2,3', num_per_class=2))
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  return with_defaults(c)  # Every key present, so each can be overridden on the command line.
