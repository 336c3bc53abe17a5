"""The sampler's two forms of top-k + top-p + draw (srdd_jax/diffusion/filtering.candidates, impl 'sort'
and 'bisect') timed on one scale's rows, after checking that they give the same distribution.

  python -m benchmarks.filter_sortfree [--rows 8192] [--vocab 4096] [--top_k 900] [--top_p 0.96]

'sort' is `lax.top_k` (k candidates in descending order, top-p by a cumulative sum); 'bisect' finds the
k-th largest logit of each row by bisection on the float's bits (32 passes of a compare-and-count),
gathers the k into slots by a prefix sum (vocabulary order, no sort) and cuts top-p by a second
bisection on their probability mass. Both draw with `jax.random.categorical`. Defaults: the last
scale of `srdd_jax.bench --quick`'s sampling (batch 32 x 16 x 16 tokens, VAR's vocabulary and filters).
Record: docs/PERFORMANCE.md (issue 33 line 5).
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax.diffusion import filtering


def _final_probs(vals, ids, vocab):
  """The distribution over the vocabulary that compact candidates describe."""
  probs = jax.nn.softmax(vals, -1)
  return jnp.zeros(ids.shape[:-1] + (vocab,)).at[jnp.arange(ids.shape[0])[:, None], ids].add(probs)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--rows', type=int, default=8192)
  ap.add_argument('--vocab', type=int, default=4096)
  ap.add_argument('--top_k', type=int, default=900)
  ap.add_argument('--top_p', type=float, default=0.96)
  ap.add_argument('--repeats', type=int, default=3)
  a = ap.parse_args(argv)
  sc = filtering.SamplerConfig(cfg=0.0, top_k=a.top_k, top_p=a.top_p)
  logits = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (a.rows, a.vocab))

  def drawer(impl):
    return lambda rng, x: filtering.draw_from(rng, *filtering.candidates(x, sc, impl), sc, False)

  head = logits[:64]
  gap = float(jnp.max(jnp.abs(_final_probs(*filtering.candidates(head, sc, 'sort'), a.vocab)
                              - _final_probs(*filtering.candidates(head, sc, 'bisect'), a.vocab))))
  if gap > 1e-6:
    raise SystemExit(f'error: the two forms\' distributions differ by {gap:.3g}')
  times = {}
  for rnd in range(2):  # Interleaved rounds: a machine's drift hits both alike.
    for name in ('sort', 'bisect'):
      f = jax.jit(drawer(name))
      f(jax.random.PRNGKey(1), logits).block_until_ready()
      for i in range(a.repeats):
        t = time.perf_counter()
        f(jax.random.PRNGKey(i), logits).block_until_ready()
        times.setdefault(name, []).append(time.perf_counter() - t)
  med = {k: float(np.median(v)) for k, v in times.items()}
  print(json.dumps({'rows': a.rows, 'vocab': a.vocab, 'top_k': a.top_k, 'top_p': a.top_p,
                    'max_prob_difference': gap, 'seconds': {k: [round(t, 3) for t in v] for k, v in times.items()},
                    'median_s': med, 'speedup': med['sort'] / med['bisect'],
                    'backend': jax.default_backend()}, indent=1))


if __name__ == '__main__':
  main()
