"""`config.tokenizer_train` typed and checked: the settings of tokenizer training.

The keys and their defaults are in srdd_jax/config.py; the architecture is config.tokenizer
(`tokenizer.api.tokenizer_config`), the images config.data, the devices config.mesh.
"""
from __future__ import annotations

import dataclasses

from srdd_jax.config import MAX_STEPS, ConfigError, section, unset_or_at_least
from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.train.discriminator import DiscriminatorConfig


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """`config.tokenizer_train` after defaults and checks, typed."""
  seed: int
  global_batch: int
  steps: int
  lr: float
  lr_schedule: str
  lr_final_fraction: float
  warmup_steps: int
  b1: float
  b2: float
  eps: float
  weight_decay: float
  clip_norm: float
  beta: float
  l1_weight: float
  l2_weight: float
  vq_weight: float
  gan_weight: float
  gan_start_step: int
  disc_lr: float
  disc_ch: int
  disc_layers: int
  usage_ema_decay: float
  dead_code_restart_every: int
  dead_code_threshold: float
  restart_from: str
  log_every: int
  eval_every: int
  eval_examples: int
  eval_split: str
  eval_path: str
  grid_examples: int
  checkpoint_every: int
  keep_checkpoints: int
  prefetch: bool

  @property
  def use_gan(self) -> bool:
    return self.gan_weight > 0

  @property
  def discriminator(self) -> DiscriminatorConfig:
    return DiscriminatorConfig(ch=self.disc_ch, num_layers=self.disc_layers)


def train_settings(config) -> TrainSettings:
  """`config.tokenizer_train` with defaults, checked; errors name the key."""
  t = section(config, 'tokenizer_train')
  unset_or_at_least(int(t['seed']), 'config.tokenizer_train.seed', 0, meaning='is config.seed')
  unset_or_at_least(float(t['disc_lr']), 'config.tokenizer_train.disc_lr', 0, meaning='is config.tokenizer_train.lr')
  if int(t['seed']) == -1:
    t['seed'] = int(config.get('seed', 0) or 0)
  if float(t['disc_lr']) == -1:
    t['disc_lr'] = t['lr']
  types = {f.name: f.type for f in dataclasses.fields(TrainSettings)}
  casts = {'int': int, 'float': float, 'str': str, 'bool': bool}
  s = TrainSettings(**{k: casts[types[k]](v) for k, v in t.items()})

  def bad(key, why):
    raise ConfigError(f'config.tokenizer_train.{key}={getattr(s, key)!r}: {why}')

  for key in ('global_batch', 'steps', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
    if getattr(s, key) < 1:
      bad(key, 'must be >= 1')
  for key in ('steps', 'warmup_steps', 'gan_start_step', 'dead_code_restart_every', 'eval_every', 'log_every',
              'checkpoint_every'):
    if getattr(s, key) > MAX_STEPS:
      bad(key, f'the step counter is a 32-bit integer; at most {MAX_STEPS}')
  for key in ('warmup_steps', 'gan_start_step', 'dead_code_restart_every', 'eval_every', 'eval_examples',
              'grid_examples'):
    if getattr(s, key) < 0:
      bad(key, 'must be >= 0')
  for key in ('lr', 'disc_lr', 'eps'):
    if not getattr(s, key) > 0:
      bad(key, 'must be > 0')
  for key in ('lr', 'disc_lr'):
    if getattr(s, key) > 1:
      bad(key, 'AdamW moves every weight by about the learning rate per step and training diverges: at most 1')
  for key in ('weight_decay', 'clip_norm', 'beta', 'l1_weight', 'l2_weight', 'vq_weight', 'gan_weight',
              'dead_code_threshold'):
    if not getattr(s, key) >= 0:
      bad(key, 'must be >= 0')
  for key in ('b1', 'b2', 'usage_ema_decay'):
    if not 0 <= getattr(s, key) < 1:
      bad(key, 'must be in [0, 1)')
  if s.restart_from not in ('residuals', 'features'):
    bad('restart_from', "must be 'residuals' (the vectors each scale quantizes) or 'features' (encoder outputs)")
  if s.lr_schedule not in ('constant', 'cosine'):
    bad('lr_schedule', "must be 'constant' or 'cosine'")
  if not 0 <= s.lr_final_fraction <= 1:
    bad('lr_final_fraction', 'must be in [0, 1]')
  if s.l1_weight + s.l2_weight == 0:
    bad('l1_weight', 'and l2_weight are both 0: the decoder would learn nothing')
  if s.use_gan and s.disc_ch < 1:
    bad('disc_ch', 'must be >= 1')
  if s.use_gan and s.disc_layers < 1:
    bad('disc_layers', 'must be >= 1')
  return s


def validate_against(settings: TrainSettings, vq: VQVAEConfig, mesh) -> None:
  """Checks that involve the architecture and the mesh."""
  data_par = mesh.shape['data'] * mesh.shape['fsdp']
  if settings.global_batch % data_par:
    raise ConfigError(
        f'config.tokenizer_train.global_batch={settings.global_batch} is not divisible by the '
        f'data-parallel size {data_par} (config.mesh {dict(mesh.shape)})')
  if settings.use_gan:
    side = settings.discriminator.output_side(vq.image_size)
    if side < 1:
      raise ConfigError(
          f'config.tokenizer_train.disc_layers={settings.disc_layers} is too deep for {vq.image_size} px '
          'images: the patch discriminator would output no patch; use fewer layers')
