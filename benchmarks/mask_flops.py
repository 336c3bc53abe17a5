"""XLA cost analysis of the transformer's training forward under the causal and markov masks.

  python -m benchmarks.mask_flops [--preset d16] [--batch 1] [--dtype bfloat16]

Lowers and compiles the forward on abstract (shape-only) parameters, so no weights are allocated,
and prints XLA's FLOP count of each mask and their ratio.
"""
import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp

from srdd_jax.convert import var_transformer
from srdd_jax.transformer.config import preset
from srdd_jax.transformer.model import VAR


def forward_flops(config, batch: int = 1) -> float:
  params = var_transformer.abstract_params(config)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  x_in = jax.ShapeDtypeStruct((batch, config.seq_len - 1, config.z_channels), jnp.float32)
  fwd = jax.jit(lambda p, l, x: VAR(config).apply({'params': p}, l, x))
  cost = fwd.lower(params, labels, x_in).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX returns one dict per computation.
    cost = cost[0]
  return float(cost['flops'])


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--preset', default='d16')
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--dtype', default='float32')
  args = ap.parse_args()
  base = preset(args.preset, dtype=args.dtype)
  out = {'preset': args.preset, 'tokens': base.seq_len, 'batch': args.batch, 'dtype': args.dtype,
         'backend': jax.default_backend()}
  for mask in ('causal', 'markov'):
    out[f'{mask}_flops'] = forward_flops(dataclasses.replace(base, mask=mask), args.batch)
  out['markov_over_causal'] = out['markov_flops'] / out['causal_flops']
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  main()
