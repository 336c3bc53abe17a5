"""A tokenizer training run of one to two minutes on 2 CPU cores: a tiny VQ-VAE on sklearn digits at 16 px.

  python -m srdd_jax.main --config=configs/tokenizer_smoke.py --workdir=DIR --mode=train_tokenizer

Every key of config.tokenizer and config.tokenizer_train, with its default, is documented in
srdd_jax/config.py. The held-out PSNR is measured on the digits' test split.
"""
import ml_collections

from srdd_jax.config import with_defaults


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  # 16 px images: patch_nums end at a 4x4 latent and ch_mult (1, 1, 2) downsamples 4x.
  c.tokenizer = ml_collections.ConfigDict(dict(
      vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, using_sa=False,
      using_mid_sa=True, share_quant_resi=4))
  c.model = ml_collections.ConfigDict(dict(patch_nums=(1, 2, 3, 4)))  # The scales, for every stage.
  c.tokenizer_train = ml_collections.ConfigDict(dict(
      global_batch=32, steps=300, lr=2e-3, warmup_steps=20, lr_schedule='cosine', beta=0.25,
      l1_weight=1.0, l2_weight=1.0, vq_weight=1.0,
      gan_weight=0.1, gan_start_step=200, disc_ch=16, disc_layers=2,
      usage_ema_decay=0.9, dead_code_restart_every=50, dead_code_threshold=0.1,
      log_every=25, eval_every=100, eval_examples=256, grid_examples=8,
      checkpoint_every=100, keep_checkpoints=2, prefetch=False))
  c.data = ml_collections.ConfigDict(dict(source='digits', split='train'))
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  return with_defaults(c)  # Every key present, so each can be overridden on the command line.
