"""Configuration and size presets of the scale-wise transformer (SPEC §2)."""
from __future__ import annotations

import dataclasses

from srdd_jax.config import PATCH_NUMS_256, PATCH_NUMS_512, ConfigError, unset_or_at_least, with_defaults

MASKS = ('causal', 'markov')
ATTENTION = ('auto', 'xla', 'cudnn', 'splash')  # srdd_jax.transformer.attention's implementations.
DTYPES = ('float32', 'bfloat16')
CPU_MATMUL = ('float32', 'bfloat16', 'auto')  # VARConfig.cpu_matmul.
# What the backward pass keeps of a block: everything ('none'), the outputs of the weight matmuls
# ('dots': attention scores, norms and activations are recomputed), or only the block input ('full').
REMAT = ('none', 'dots', 'full')

# VAR's `init_adaln_gamma` per depth (its training script); deeper models start closer to identity.
_ADALN_GAMMA = {16: 1e-3, 20: 1e-3, 24: 1e-4, 30: 1e-5, 36: 1e-5}


@dataclasses.dataclass(frozen=True)
class VARConfig:
  depth: int = 16
  width: int = 0  # 0 = 64 * depth.
  num_heads: int = 0  # 0 = depth (head dim 64 at the default width).
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  vocab_size: int = 4096
  z_channels: int = 32  # Cvae of the tokenizer.
  patch_nums: tuple[int, ...] = PATCH_NUMS_256
  shared_aln: bool = False
  attn_l2_norm: bool = True
  drop_path_rate: float = -1.0  # -1 = VAR's 0.1 * depth / 24.
  cond_drop_rate: float = 0.1  # Label dropout to the null class, for classifier-free guidance.
  norm_eps: float = 1e-6
  mask: str = 'markov'
  # Initialisation (VAR): std sqrt(1/(3C)) when init_std < 0.
  init_std: float = -1.0
  init_head: float = 0.02
  init_adaln: float = 0.5
  init_adaln_gamma: float = -1.0  # -1 = by depth (1e-3 d16/d20, 1e-4 d24, 1e-5 d30+).
  dtype: str = 'float32'  # Compute dtype of the matmuls; params, residual, norms, softmax stay f32.
  # The blocks as one nn.scan over stacked parameters (`blocks/...`, leading depth axis): one compiled
  # block instead of `depth` copies. False keeps VAR's per-block layout (`blocks_0/...`).
  scan_blocks: bool = False
  remat: str = 'none'
  attention: str = 'auto'  # One of ATTENTION; 'auto' = by the platform (attention.resolve_impl).
  # Masked resampling `refine` (SPEC §5): a second input stream of the current scale's revealed tokens
  # ([MASK] elsewhere) through a zero-initialised projection; off, the parameters do not exist.
  refine: bool = False
  # On a CPU, the matmuls' weight gradients and the training attention by hand-written backward passes
  # (transformer/cpu_kernels.py: autodiff's values, laid out for XLA:CPU); False: autodiff's everywhere.
  # Other backends always take autodiff's.
  cpu_kernels: bool = True
  # What a float32 model's matmuls multiply in on a CPU (cpu_kernels.matmul): 'float32'; 'bfloat16' (inputs
  # rounded to bfloat16, products summed in float32, activations and everything else float32: twice
  # the matmul rate on CPUs with bfloat16 dot instructions); 'auto' = bfloat16 where this host's CPU has
  # them (AVX512-BF16 or AMX), else float32. Other backends and bfloat16 models ignore it.
  cpu_matmul: str = 'float32'

  def __post_init__(self):
    object.__setattr__(self, 'patch_nums', tuple(int(p) for p in self.patch_nums))
    if self.width == 0:
      object.__setattr__(self, 'width', 64 * self.depth)
    if self.num_heads == 0:
      object.__setattr__(self, 'num_heads', self.depth)
    if self.drop_path_rate < 0:
      object.__setattr__(self, 'drop_path_rate', 0.1 * self.depth / 24)
    if self.init_adaln_gamma < 0:
      nearest = min(_ADALN_GAMMA, key=lambda d: (abs(d - self.depth), d))
      object.__setattr__(self, 'init_adaln_gamma', _ADALN_GAMMA[nearest])
    self.validate()

  def validate(self):
    def bad(key, why):
      raise ValueError(f'VARConfig.{key}={getattr(self, key)!r}: {why}')

    if self.depth < 1:
      bad('depth', 'must be >= 1')
    if self.width < 1 or self.num_heads < 1 or self.width % self.num_heads:
      bad('width', f'must be a positive multiple of num_heads={self.num_heads}')
    if self.mask not in MASKS:
      bad('mask', f'must be one of {MASKS}')
    if self.attention not in ATTENTION:
      bad('attention', f'must be one of {ATTENTION}')
    if self.dtype not in DTYPES:
      bad('dtype', f'must be one of {DTYPES}')
    if self.cpu_matmul not in CPU_MATMUL:
      bad('cpu_matmul', f'must be one of {CPU_MATMUL}')
    if self.remat not in REMAT:
      bad('remat', f'must be one of {REMAT}')
    if not self.patch_nums or any(p < 1 for p in self.patch_nums):
      bad('patch_nums', 'must be a non-empty sequence of positive sides')
    if any(b <= a for a, b in zip(self.patch_nums, self.patch_nums[1:])):
      bad('patch_nums', 'the sides must increase strictly, one scale after the other')
    if self.num_classes < 1:
      bad('num_classes', 'must be >= 1 (use 1 for unconditional models)')
    if not 0 <= self.cond_drop_rate < 1:
      bad('cond_drop_rate', 'must be in [0, 1)')

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def num_scales(self) -> int:
    return len(self.patch_nums)

  @property
  def seq_len(self) -> int:
    return sum(p * p for p in self.patch_nums)

  @property
  def first_l(self) -> int:
    return self.patch_nums[0] ** 2

  @property
  def begin_ends(self) -> tuple[tuple[int, int], ...]:
    out, cur = [], 0
    for p in self.patch_nums:
      out.append((cur, cur + p * p))
      cur += p * p
    return tuple(out)

  @property
  def mlp_dim(self) -> int:
    return round(self.width * self.mlp_ratio)

  @property
  def std(self) -> float:
    return self.init_std if self.init_std >= 0 else (1 / self.width / 3) ** 0.5


def preset(name: str, **overrides) -> VARConfig:
  """VAR's released sizes: d16, d20, d24, d30 (256 px) and d36 (shared AdaLN, 512 px)."""
  presets = {
      'd16': dict(depth=16),
      'd20': dict(depth=20),
      'd24': dict(depth=24),
      'd30': dict(depth=30),
      'd36': dict(depth=36, shared_aln=True, patch_nums=PATCH_NUMS_512),
  }
  if name not in presets:
    raise ValueError(f'unknown model preset {name!r}; known: {sorted(presets)}')
  return VARConfig(**{**presets[name], **overrides})


def var_config(config, vocab_size: int, z_channels: int) -> VARConfig:
  """The transformer config.model describes, for a tokenizer of `vocab_size` codes of `z_channels`;
  errors name the config key."""
  m = with_defaults(config).model
  unset_or_at_least(float(m.drop_path_rate), 'config.model.drop_path_rate', 0, meaning="is VAR's 0.1 x depth / 24")
  sizes = {k: int(v) for k, v in (('depth', m.depth), ('width', m.width), ('num_heads', m.heads)) if int(v)}
  common = dict(num_classes=int(m.num_classes), vocab_size=int(vocab_size), z_channels=int(z_channels),
                patch_nums=tuple(m.patch_nums), mask=m.mask or 'markov', dtype=m.dtype,
                cond_drop_rate=float(m.cond_drop_rate), drop_path_rate=float(m.drop_path_rate),
                scan_blocks=bool(m.scan), remat=m.remat, attention=m.attention, refine=bool(m.refine),
                cpu_matmul=m.cpu_matmul)
  try:
    if m.preset:
      return preset(m.preset, **sizes, **common)
    if 'depth' not in sizes:
      raise ValueError('config.model.preset is empty, so config.model.depth must be > 0')
    return VARConfig(**sizes, **common)
  except ValueError as e:  # VARConfig names its field; config.model's key has the same name.
    msg = str(e).replace('VARConfig.', 'config.model.')
    raise ConfigError(msg if msg.startswith('config.') else f'config.model: {msg}') from e
