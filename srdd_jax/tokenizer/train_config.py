"""Every key of `--mode=train_tokenizer` with its default, and the start-up checks that name them.

A config gives the architecture in `config.tokenizer`, the training in `config.tokenizer_train`, the
images in `config.data` (see srdd_jax/data/pipeline.py) and the devices in `config.mesh` (and optionally
`config.mesh_rules`), like `--mode=train`. Missing keys take the defaults below; an unknown key in
`config.tokenizer_train` is an error (a typo there would otherwise be silently ignored).
"""
from __future__ import annotations

import dataclasses

from srdd_jax.tokenizer.discriminator import DiscriminatorConfig
from srdd_jax.tokenizer.vqvae import VQVAEConfig


class TokenizerTrainConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


# config.tokenizer: the architecture (VQVAEConfig's fields; VAR's vae_ch160v4096z32 by default).
# Other keys of the section (checkpoint, allow_random, ... of the other modes) are not read here.
ARCH_DEFAULTS = {
    'vocab_size': 4096,
    'z_channels': 32,
    'ch': 160,
    'ch_mult': (1, 1, 2, 2, 4),
    'num_res_blocks': 2,  # Encoder; the decoder has one more per level.
    'using_sa': True,
    'using_mid_sa': True,
    'share_quant_resi': 4,  # 0: one phi per scale, 1: one shared phi, K >= 2: K phis (VAR: 4).
    'quant_resi': 0.5,
    'patch_nums': (),  # () = config.model.patch_nums when the config has one, else SPEC's 256 px scales.
    'image_size': 0,  # 0 = derived: patch_nums[-1] * 2^(len(ch_mult) - 1). Non-zero: checked against it.
    'precision': 'highest',
}

# config.tokenizer_train.
TRAIN_DEFAULTS = {
    'seed': -1,  # -1 = config.seed (0 when absent). Data order, init, restarts: all functions of it.
    'global_batch': 64,
    'steps': 100_000,
    # Generator (encoder, quantizer, decoder) optimiser: AdamW, linear warm-up from 0, then constant or
    # cosine to lr * lr_final_fraction. The codebook, biases and norms are never weight-decayed.
    'lr': 1e-4,
    'lr_schedule': 'constant',  # 'constant' | 'cosine'.
    'lr_final_fraction': 0.1,  # cosine only.
    'warmup_steps': 0,
    'b1': 0.9,
    'b2': 0.95,
    'eps': 1e-8,
    'weight_decay': 0.0,
    'clip_norm': 0.0,  # Global-norm gradient clipping; 0 = off.
    # Loss: l1 * |x - x'| + l2 * (x - x')^2 + vq * VQ + gan * adversarial (all means).
    'beta': 0.25,  # Commitment weight inside the VQ loss (SPEC §1).
    'l1_weight': 1.0,
    'l2_weight': 1.0,
    'vq_weight': 1.0,
    'gan_weight': 0.0,  # 0 = no discriminator at all (none is built, none is checkpointed).
    'gan_start_step': 5000,  # Before it the adversarial term is 0 and the discriminator is not updated.
    'disc_lr': -1.0,  # -1 = lr. Same betas, warm-up and schedule as the generator.
    'disc_ch': 64,
    'disc_layers': 3,  # Stride-2 layers of the patch discriminator; 2 for images under ~32 px.
    # Codebook.
    'usage_ema_decay': 0.99,  # EMA of per-scale code frequencies (logged and used for restarts).
    'dead_code_restart_every': 1000,  # Steps between restarts (at steps K, 2K, ...); 0 = never.
    'dead_code_threshold': 0.05,  # Dead: overall EMA share < threshold / vocab_size.
    # Logging, evaluation, checkpoints.
    'log_every': 100,
    'eval_every': 1000,  # Held-out PSNR every this many steps (and at the start and the end); 0 = never.
    'eval_examples': 256,  # Held-out images for the PSNR (padded to a multiple of global_batch).
    'eval_split': 'test',  # digits, fashion_mnist, tfds: the held-out split.
    'eval_path': '',  # folder: the held-out folder ('' = the training folder, with a warning).
    'grid_examples': 8,  # Held-out images in reconstructions.png.
    'checkpoint_every': 1000,
    'keep_checkpoints': 3,
    'prefetch': True,  # True: tf.data threads decode ahead; False: decode each batch in the loop.
}


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


def _section(config, name: str) -> dict:
  if name not in config:
    return {}
  value = config[name]
  return value.to_dict() if hasattr(value, 'to_dict') else dict(value)


def vqvae_config(config) -> VQVAEConfig:
  """The architecture of `config.tokenizer` (with defaults) as a VQVAEConfig; errors name the key."""
  given = _section(config, 'tokenizer')
  a = {k: given.get(k, v) for k, v in ARCH_DEFAULTS.items()}
  model_pn = tuple(_section(config, 'model').get('patch_nums', ()) or ())
  pn = tuple(a['patch_nums'] or ()) or model_pn or VQVAEConfig.patch_nums
  if model_pn and tuple(model_pn) != tuple(pn):
    raise TokenizerTrainConfigError(
        f'config.tokenizer.patch_nums={tuple(pn)} differs from config.model.patch_nums={model_pn}: the '
        'transformer is trained on the tokenizer\'s scales, so they must be the same')
  try:
    vq = VQVAEConfig(vocab_size=int(a['vocab_size']), z_channels=int(a['z_channels']), ch=int(a['ch']),
                     ch_mult=tuple(a['ch_mult']), num_res_blocks=int(a['num_res_blocks']),
                     using_sa=bool(a['using_sa']), using_mid_sa=bool(a['using_mid_sa']),
                     patch_nums=pn, share_quant_resi=int(a['share_quant_resi']),
                     quant_resi=float(a['quant_resi']), precision=str(a['precision']))
  except ValueError as e:  # VQVAEConfig names its field; the config key is the same name.
    raise TokenizerTrainConfigError(str(e).replace('VQVAEConfig.', 'config.tokenizer.')) from e
  size = int(a['image_size'])
  if size and size != vq.image_size:
    raise TokenizerTrainConfigError(
        f'config.tokenizer.image_size={size}, but config.tokenizer.patch_nums={vq.patch_nums} ends at a '
        f'{vq.latent_side}x{vq.latent_side} latent and ch_mult={vq.ch_mult} downsamples {vq.downsample}x, '
        f'which is {vq.image_size} px: end patch_nums at {size // vq.downsample} (or change ch_mult)')
  return vq


def train_settings(config) -> TrainSettings:
  """`config.tokenizer_train` with defaults, checked; errors name the key."""
  given = _section(config, 'tokenizer_train')
  unknown = sorted(set(given) - set(TRAIN_DEFAULTS))
  if unknown:
    raise TokenizerTrainConfigError(f'config.tokenizer_train has unknown keys {unknown}; known: '
                                    f'{sorted(TRAIN_DEFAULTS)}')
  t = {k: given.get(k, v) for k, v in TRAIN_DEFAULTS.items()}
  if int(t['seed']) < 0:
    t['seed'] = int(config.get('seed', 0) or 0) if hasattr(config, 'get') else 0
  if float(t['disc_lr']) < 0:
    t['disc_lr'] = t['lr']
  types = {f.name: f.type for f in dataclasses.fields(TrainSettings)}
  casts = {'int': int, 'float': float, 'str': str, 'bool': bool}
  s = TrainSettings(**{k: casts[types[k]](v) for k, v in t.items()})

  def bad(key, why):
    raise TokenizerTrainConfigError(f'config.tokenizer_train.{key}={getattr(s, key)!r}: {why}')

  for key in ('global_batch', 'steps', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
    if getattr(s, key) < 1:
      bad(key, 'must be >= 1')
  for key in ('warmup_steps', 'gan_start_step', 'dead_code_restart_every', 'eval_every', 'eval_examples',
              'grid_examples'):
    if getattr(s, key) < 0:
      bad(key, 'must be >= 0')
  for key in ('lr', 'disc_lr', 'eps'):
    if not getattr(s, key) > 0:
      bad(key, 'must be > 0')
  for key in ('weight_decay', 'clip_norm', 'beta', 'l1_weight', 'l2_weight', 'vq_weight', 'gan_weight',
              'dead_code_threshold'):
    if not getattr(s, key) >= 0:
      bad(key, 'must be >= 0')
  for key in ('b1', 'b2', 'usage_ema_decay'):
    if not 0 <= getattr(s, key) < 1:
      bad(key, 'must be in [0, 1)')
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
    raise TokenizerTrainConfigError(
        f'config.tokenizer_train.global_batch={settings.global_batch} is not divisible by the '
        f'data-parallel size {data_par} (config.mesh {dict(mesh.shape)})')
  if settings.use_gan:
    side = settings.discriminator.output_side(vq.image_size)
    if side < 1:
      raise TokenizerTrainConfigError(
          f'config.tokenizer_train.disc_layers={settings.disc_layers} is too deep for {vq.image_size} px '
          'images: the patch discriminator would output no patch; use fewer layers')
