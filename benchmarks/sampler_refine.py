"""Seconds per batch of the refine sampler (masked resampling `refine`, 0.01 x 10, markov), and its tokens.

  python -m benchmarks.sampler_refine --model DIR/export/step_N --tokenizer DIR/tokenizer/params --out ids.npy

A refine model (config.model.refine) sampled with cfg 3, top-p 0.96 (top-k off, the embedded default's
setting), batch 100 (10 classes x 10): the median of 3 timed calls after a compiling one. --out saves the
token ids of the last call, so two versions of the code can be compared for identical tokens.
Record: docs/PERFORMANCE.md, "Refine sampling", measured at commit be80a92.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import numpy as np

from srdd_jax.convert.params_io import load_var, load_vqvae
from srdd_jax.diffusion.filtering import SamplerConfig
from srdd_jax.diffusion.sampler import Sampler, batch_rng


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', required=True)
  p.add_argument('--tokenizer', required=True)
  p.add_argument('--out', default='')
  a = p.parse_args(argv)
  vc, params = load_var(a.model)
  vq, vae_params = load_vqvae(a.tokenizer)
  vq = dataclasses.replace(vq, patch_nums=vc.patch_nums)
  sc = SamplerConfig(cfg=3.0, top_k=0, top_p=0.96, mr_threshold=0.01, mr_iterations=10, mr_mode='refine')
  fn = jax.jit(Sampler(vc, vq, sc, mask='markov').tokens)
  labels = np.arange(100) % 10
  jax.block_until_ready(fn(params, vae_params, labels, batch_rng(0, 0)))
  times = []
  for r in range(3):
    t0 = time.perf_counter()
    ids, _ = fn(params, vae_params, labels, batch_rng(0, r))
    jax.block_until_ready(ids)
    times.append(time.perf_counter() - t0)
  print(f'seconds per batch of 100: {statistics.median(times):.2f}')
  if a.out:
    np.save(a.out, np.concatenate([np.asarray(x) for x in ids], axis=1))


if __name__ == '__main__':
  main()
