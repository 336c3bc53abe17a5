"""Attention paths timed forward + backward, both masks, at VAR's 256-px scales (docs/attention_notes.md).

  JAX_PLATFORMS=cpu python -m benchmarks.attention --rounds 15   # which chunking: the CPU table
  python -m benchmarks.attention                                  # the implementations: the GPU table

Two sets of variants (--variants; `chunkings` by default on a CPU, `implementations` elsewhere):
  chunkings        the xla attention over the dense (L, L) mask, over the scale chunks grouped to at
                   least g tokens (--groups) and over fixed query blocks (--blocks); d6-like: 6 heads x 64,
                   float32 compute, batch 8, 7 rounds by default.
  implementations  the dense mask, `sequence_attention` with impl 'xla', with impl 'cudnn' (small scales
                   grouped on xla, the large scales alone on cuDNN) and with 'cudnn' one chunk per scale
                   (every chunk on cuDNN, no mask); d16: 16 heads x 64, bfloat16 compute, batch 16, 20
                   rounds; then a whole VAR (depth 2) with attention 'cudnn' against 'xla'.
L = 680. Every variant is jitted and warmed first (one that fails is reported and left out); then the
rounds run the variants interleaved (one call each, ended by block_until_ready), so that the load of a
shared machine falls on all of them alike. Reported: median (min) ms of `jax.grad` of sum(out * w) with
respect to q, k and v, and the forward's relative L2 error against the float32 dense attention.
Both tables of docs/attention_notes.md came with commit d873155, from benchmarks/attention_cpu.py and
attention_gpu.py of that commit (one script since; the measured code is that commit's).
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

SCALE = 0.125  # 1 / sqrt(64).
DEFAULTS = {'chunkings': {'heads': 6, 'dtype': 'float32', 'batch': 8, 'rounds': 7},
            'implementations': {'heads': 16, 'dtype': 'bfloat16', 'batch': 16, 'rounds': 20}}


def chunked(chunk_list, dtype):
  def f(q, k, v):
    outs = [attention.dot_product_attention(q[:, qb:qe], k[:, kb:ke], v[:, kb:ke], SCALE, m, dtype)
            for qb, qe, kb, ke, m in chunk_list]
    return jnp.concatenate(outs, axis=1)
  return f


def variants(kind: str, pn, mask: str, dtype, groups, blocks) -> dict:
  """name -> (attention function of q, k, v; its number of chunks, or None)."""
  dense = attention.causal_mask(pn) if mask == 'causal' else attention.markov_mask(pn)
  out = {'dense (L, L) mask': (lambda q, k, v: attention.dot_product_attention(q, k, v, SCALE, dense, dtype),
                               None)}
  if kind == 'chunkings':
    for g in groups:
      c = attention.chunks(pn, mask, g)
      out[f'scales grouped, >= {g} tokens'] = (chunked(c, dtype), len(c))
    for b in blocks:
      c = attention.chunks(pn, mask, block=b)
      out[f'fixed {b}-query blocks'] = (chunked(c, dtype), len(c))
    return out
  seq = lambda impl, g=attention.GROUP_MIN: (lambda q, k, v: attention.sequence_attention(
      q, k, v, scale=SCALE, patch_nums=pn, mask=mask, dtype=dtype, impl=impl, group_min=g))
  out.update({f'xla, grouped (>= {attention.GROUP_MIN})': (seq('xla'), None),
              f'cudnn, grouped (>= {attention.GROUP_MIN})': (seq('cudnn'), None),
              'cudnn, one chunk per scale': (seq('cudnn', 0), None)})
  return out


def var_cudnn_check(r) -> None:
  """A 2-block VAR's logits with attention 'cudnn' against 'xla', both masks."""
  for mask in attention.MASKS:
    c = VARConfig(depth=2, width=128, num_heads=2, num_classes=4, vocab_size=64, z_channels=8, mask=mask,
                  dtype='bfloat16', init_adaln_gamma=0.5)
    labels, x_in = jnp.arange(2) % 4, jnp.asarray(r.randn(2, c.seq_len - 1, 8).astype(np.float32))
    params = VAR(c).init(jax.random.PRNGKey(0), labels, x_in)
    out = {a: jax.jit(VAR(dataclasses.replace(c, attention=a)).apply)(params, labels, x_in)
           for a in ('xla', 'cudnn')}
    err = float(jnp.linalg.norm(out['cudnn'] - out['xla']) / jnp.linalg.norm(out['xla']))
    print(f'VAR d2 {mask}: logits attention=cudnn vs xla, rel. error {err:.2e}')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--variants', choices=tuple(DEFAULTS), default=None,
                 help='default: chunkings on a CPU, implementations elsewhere')
  p.add_argument('--batch', type=int, default=None)
  p.add_argument('--rounds', type=int, default=None)
  p.add_argument('--heads', type=int, default=None)
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default=None)
  p.add_argument('--masks', default='causal,markov')
  p.add_argument('--groups', default='0,32,64,128,256', help='chunkings: group_min values of the scale chunks')
  p.add_argument('--blocks', default='64,128', help='chunkings: fixed query block sizes ("" for none)')
  args = p.parse_args(argv)
  kind = args.variants or ('chunkings' if jax.default_backend() == 'cpu' else 'implementations')
  o = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in DEFAULTS[kind].items()}
  pn, d, dtype = PATCH_NUMS_256, 64, jnp.dtype(o['dtype'])
  L = sum(x * x for x in pn)
  r = np.random.RandomState(0)
  q, k, v, w = (jnp.asarray(r.randn(o['batch'], L, o['heads'], d).astype(np.float32)) for _ in range(4))
  ints = lambda a: [int(x) for x in a.split(',') if x]
  print(f'{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}: {kind}, '
        f'B={o["batch"]} L={L} H={o["heads"]} D={d} {o["dtype"]}, fwd+bwd, median of {o["rounds"]} '
        'interleaved rounds')
  for mask in args.masks.split(','):
    dense = attention.causal_mask(pn) if mask == 'causal' else attention.markov_mask(pn)
    reference = jax.jit(lambda q, k, v, m=dense: attention.dot_product_attention(q, k, v, SCALE, m, jnp.float32))
    ref = reference(q, k, v)
    grads, errs, counts = {}, {}, {}
    for n, (f, count) in variants(kind, pn, mask, dtype, ints(args.groups), ints(args.blocks)).items():
      try:
        errs[n] = float(jnp.linalg.norm(jax.jit(f)(q, k, v) - ref) / jnp.linalg.norm(ref))
        # A scalar of the output against fixed weights, so the backward sees a dense cotangent.
        g = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2)))
        jax.block_until_ready(g(q, k, v))
        grads[n], counts[n] = g, count
      except Exception as e:  # pylint: disable=broad-except
        print(f'  {mask} {n}: FAILED {type(e).__name__}: {str(e)[:300]}')
    times = {n: [] for n in grads}
    for _ in range(o['rounds']):
      for n, g in grads.items():
        t = time.perf_counter()
        jax.block_until_ready(g(q, k, v))
        times[n].append(time.perf_counter() - t)
    print(f'\n{mask}:')
    for n, ts in times.items():
      print(f'  {n:32s} {1e3 * statistics.median(ts):8.3f} ms  (min {1e3 * min(ts):.3f})  '
            f'fwd rel. error vs float32 {errs[n]:.2e}' + (f'  chunks={counts[n]}' if counts[n] else ''))
  if kind == 'implementations':
    var_cudnn_check(r)


if __name__ == '__main__':
  main()
