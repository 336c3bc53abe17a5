"""GPU check and timing of the attention paths, forward + backward, both masks (docs/attention_notes.md).

  python -m benchmarks.attention_gpu [--batch 16] [--rounds 20]

d16 shapes: 16 heads x 64, L = 680 (256 px), bfloat16 compute. Variants: the dense (L, L) masked
attention (the old causal path), `sequence_attention` with impl 'xla', with impl 'cudnn' (grouped small
scales on xla, the large scales alone on cuDNN) and with impl 'cudnn' one chunk per scale (every chunk
on cuDNN, no mask). Also the relative error of each against float32 and a whole VAR (depth 2) with
attention 'cudnn' against 'xla'. Medians of interleaved rounds, each ended by block_until_ready.
"""
import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax.config import PATCH_NUMS_256
from srdd_jax.transformer import attention
from srdd_jax.transformer.config import VARConfig
from srdd_jax.transformer.model import VAR


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--rounds', type=int, default=20)
  args = p.parse_args()
  pn, h, d, scale, bf = PATCH_NUMS_256, 16, 64, 0.125, jnp.bfloat16
  L = sum(x * x for x in pn)
  r = np.random.RandomState(0)
  q, k, v, w = (jnp.asarray(r.randn(args.batch, L, h, d).astype(np.float32)) for _ in range(4))
  print(f'{jax.devices()[0].device_kind}, jax {jax.__version__}, B={args.batch} L={L} H={h} D={d} bf16')
  for mask in attention.MASKS:
    dense = attention.causal_mask(pn) if mask == 'causal' else attention.markov_mask(pn)
    seq = lambda impl, g=attention.GROUP_MIN: (lambda q, k, v: attention.sequence_attention(
        q, k, v, scale=scale, patch_nums=pn, mask=mask, dtype=bf, impl=impl, group_min=g))
    fns = {'dense (L, L) mask': lambda q, k, v: attention.dot_product_attention(q, k, v, scale, dense, bf),
           'xla, grouped': seq('xla'), 'cudnn, grouped': seq('cudnn'), 'cudnn, per scale': seq('cudnn', 0)}
    ref = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, scale, dense, jnp.float32))(q, k, v)
    grads, errs = {}, {}
    for n, f in fns.items():
      try:
        errs[n] = float(jnp.linalg.norm(jax.jit(f)(q, k, v) - ref) / jnp.linalg.norm(ref))
        g = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2)))
        jax.block_until_ready(g(q, k, v))
        grads[n] = g
      except Exception as e:  # pylint: disable=broad-except
        print(f'  {mask} {n}: FAILED {type(e).__name__}: {str(e)[:300]}')
    times = {n: [] for n in grads}
    for _ in range(args.rounds):
      for n, g in grads.items():
        t = time.perf_counter()
        jax.block_until_ready(g(q, k, v))
        times[n].append(time.perf_counter() - t)
    print(f'{mask}:')
    for n, ts in times.items():
      print(f'  {n:20s} fwd+bwd {1e3 * statistics.median(ts):7.3f} ms (min {1e3 * min(ts):.3f})  '
            f'fwd rel. error vs float32 {errs[n]:.2e}')
  for mask in attention.MASKS:
    c = VARConfig(depth=2, width=128, num_heads=2, num_classes=4, vocab_size=64, z_channels=8, mask=mask,
                  dtype='bfloat16', init_adaln_gamma=0.5)
    labels, x_in = jnp.arange(2) % 4, jnp.asarray(r.randn(2, c.seq_len - 1, 8).astype(np.float32))
    params = VAR(c).init(jax.random.PRNGKey(0), labels, x_in)
    out = {a: jax.jit(VAR(dataclasses.replace(c, attention=a)).apply)(params, labels, x_in)
           for a in ('xla', 'cudnn')}
    err = float(jnp.linalg.norm(out['cudnn'] - out['xla']) / jnp.linalg.norm(out['xla']))
    print(f'VAR d2 {mask}: logits attention=cudnn vs xla, rel. error {err:.2e}')


if __name__ == '__main__':
  main()
