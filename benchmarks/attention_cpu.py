"""CPU timing of the xla attention chunkings, forward + backward, both masks (docs/attention_notes.md).

  JAX_PLATFORMS=cpu python -m benchmarks.attention_cpu [--rounds 7] [--batch 8]

d6-like shapes: width 384 = 6 heads x 64, L = 680 (256 px), float32. Every variant is jitted and
warmed first; then the rounds run the variants interleaved (one call each, ended by
block_until_ready) so that the load of a shared CPU falls on all of them alike; medians reported.
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax.config import PATCH_NUMS_256
from srdd_jax.transformer import attention


def chunked(chunk_list, scale):
  def f(q, k, v):
    outs = [attention.dot_product_attention(q[:, qb:qe], k[:, kb:ke], v[:, kb:ke], scale, m)
            for qb, qe, kb, ke, m in chunk_list]
    return jnp.concatenate(outs, axis=1)
  return f


def variants(pn, mask, scale, groups, blocks):
  dense = attention.causal_mask(pn) if mask == 'causal' else attention.markov_mask(pn)
  out = {'dense (L, L) mask': lambda q, k, v: attention.dot_product_attention(q, k, v, scale, dense)}
  for g in groups:
    out[f'scales grouped, >= {g} tokens'] = chunked(attention.chunks(pn, mask, g), scale)
  for b in blocks:
    out[f'fixed {b}-query blocks'] = chunked(attention.chunks(pn, mask, block=b), scale)
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--rounds', type=int, default=7)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--masks', default='causal,markov')
  p.add_argument('--groups', default='0,32,64,128,256', help='group_min values of the scale chunks')
  p.add_argument('--blocks', default='64,128', help='fixed query block sizes ("" for none)')
  args = p.parse_args()
  pn, h, d, scale = PATCH_NUMS_256, 6, 64, 0.125
  L = sum(x * x for x in pn)
  r = np.random.RandomState(0)
  q, k, v, w = (jnp.asarray(r.randn(args.batch, L, h, d).astype(np.float32)) for _ in range(4))
  print(f'backend {jax.default_backend()}, B={args.batch} L={L} H={h} D={d} float32, fwd+bwd, '
        f'median of {args.rounds} interleaved rounds')
  for mask in args.masks.split(','):
    fns = {}
    ints = lambda a: [int(x) for x in a.split(',') if x]
    for name, f in variants(pn, mask, scale, ints(args.groups), ints(args.blocks)).items():
      # A scalar of the output against fixed weights, so the backward sees a dense cotangent.
      g = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2)))
      jax.block_until_ready(g(q, k, v))
      fns[name] = g
    times = {n: [] for n in fns}
    for _ in range(args.rounds):
      for n, g in fns.items():
        t = time.perf_counter()
        jax.block_until_ready(g(q, k, v))
        times[n].append(time.perf_counter() - t)
    print(f'\n{mask}:')
    for n, ts in times.items():
      print(f'  {n:28s} {1e3 * statistics.median(ts):8.1f} ms  (min {1e3 * min(ts):.1f})  '
            f'chunks={len(attention.chunks(pn, mask, int(n.split()[-2]))) if "grouped" in n else "-"}')


if __name__ == '__main__':
  main()
