"""XLA cost analysis of the transformer's training forward under the causal and markov masks.

  python -m benchmarks.mask_flops [--preset d16] [--batch 1] [--dtype bfloat16]

Lowers and compiles the forward on abstract (shape-only) parameters, so no weights are allocated
(`srdd_jax.transformer.flops.compiled_forward_flops`), and prints XLA's FLOP count of each mask and
their ratio. Record: docs/PERFORMANCE.md, "FLOPs of the training forward", measured at commit b90bf8a
(the dense attention's table) and 80772c9 (the chunked attention's numbers below it).
"""
import argparse
import dataclasses
import json

import jax

from srdd_jax.transformer.config import preset
from srdd_jax.transformer.flops import compiled_forward_flops


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
    out[f'{mask}_flops'] = compiled_forward_flops(dataclasses.replace(base, mask=mask), args.batch)
  out['markov_over_causal'] = out['markov_flops'] / out['causal_flops']
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  main()
