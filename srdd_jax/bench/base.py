"""What every part of the bench shares: its log, error records and exit, the models it builds (VAR at a
depth, the tokenizer beside it), their analytic FLOPs, and the sampler's settings."""
from __future__ import annotations

import sys
import time
import traceback

from srdd_jax.diffusion.filtering import SamplerConfig
from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.transformer import flops
from srdd_jax.transformer.config import VARConfig

# The evaluation protocol of VAR's paper; the sampler's cost depends on it (guidance doubles the batch).
SAMPLER = SamplerConfig(cfg=1.5, cfg_schedule='linear', top_k=900, top_p=0.96)
# Sampling decodes at the accelerator's default matmul precision, as config.sampler.decode_precision does.
DECODE_PRECISION = 'default'
# Every timed record has these keys (None where they do not apply); AOT records have aot.AOT_FIELDS.
RECORD_FIELDS = ('mode', 'kind', 'depth', 'width', 'heads', 'seq_len', 'batch', 'dtype', 'seconds',
                 'all_s', 'tokens_per_s', 'images_per_s', 'memory_bytes', 'compile_s')
# Every clock of the bench (its log, wall_s, the suite's budget) counts from here: near the process's start.
T0 = time.perf_counter()


def log(msg: str) -> None:
  print(f'[{time.strftime("%H:%M:%S")} +{time.perf_counter() - T0:6.1f}s] {msg}', file=sys.stderr,
        flush=True)


def error_info(e: BaseException) -> dict:
  """{'error': 'Type: message' (shortened), 'traceback': the formatted traceback (shortened)}."""
  msg = f'{type(e).__name__}: {e}'
  tb = ''.join(traceback.format_exception(type(e), e, e.__traceback__))
  return {'error': msg if len(msg) < 3000 else msg[:3000] + ' ...',
          'traceback': tb if len(tb) < 6000 else tb[:1500] + '\n...\n' + tb[-4500:]}


def fail(msg: str) -> None:
  """One `error:` line, exit status 2 (bad input: no traceback)."""
  print(f'error: {msg}', file=sys.stderr, flush=True)
  sys.exit(2)


def gb(x) -> str:
  return '-' if x is None else f'{x / 2**30:.2f}'


# --- FLOP counts -----------------------------------------------------------------------------------

def train_flops(c: VARConfig, batch: int) -> dict:
  """Analytic FLOPs of one train step (`srdd_jax.transformer.flops`): 'train_per_step' counts the
  attention pairs the code computes, 'train_per_step_useful' those the mask keeps."""
  f = flops.forward_flops(c)
  return {'weights_per_token': f['weights_per_token'], 'weights_per_image': f['weights_per_image'],
          'forward_per_image_dense': f['dense'], 'forward_per_image_attention': f['attention_computed'],
          'forward_per_image_attention_useful': f['attention'],
          'train_per_step': 3 * batch * (f['dense'] + f['attention_computed']),
          'train_per_step_useful': 3 * batch * f['total']}


# --- configurations --------------------------------------------------------------------------------

def model_config(depth: int, mask: str, dtype: str, width: int = 0, heads: int = 0,
                 patch_nums=None, **model) -> VARConfig:
  """VAR at `depth` (width 64 * depth, depth heads unless given), 256 px, vocabulary 4096, Cvae 32;
  `model`: further VARConfig fields (scan_blocks, remat, attention)."""
  kw = {} if patch_nums is None else {'patch_nums': tuple(patch_nums)}
  return VARConfig(depth=depth, width=width, num_heads=heads, mask=mask, dtype=dtype, **kw, **model)


def tokenizer_config(var_config: VARConfig, ch: int) -> VQVAEConfig:
  """VAR's tokenizer (ch 160) or the same architecture with `ch` channels, matching the transformer."""
  return VQVAEConfig(vocab_size=var_config.vocab_size, z_channels=var_config.z_channels, ch=ch,
                     patch_nums=var_config.patch_nums)


def model_fields(c: VARConfig, batch: int) -> dict:
  """The model's fields of a record (timed or AOT)."""
  return {'mode': c.mask, 'depth': c.depth, 'width': c.width, 'heads': c.num_heads, 'seq_len': c.seq_len,
          'batch': batch, 'dtype': c.dtype, 'cpu_matmul': c.cpu_matmul}
