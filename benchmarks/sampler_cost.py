"""Memory (XLA memory analysis) and CPU speed of markov vs causal sampling.

  python -m benchmarks.sampler_cost memory [--preset d16] [--batch 32] [--dtype float32]
  python -m benchmarks.sampler_cost speed [--depth 4] [--width 256] [--batch 16] [--repeats 3]

`memory` compiles the token sampler on abstract (random-shape) parameters and prints the arguments,
outputs and temporaries of each mask, with the sampler's compiler options (on CPU: XLA's YNN fusion
off, see srdd_jax/parallel/compile.py) and with the backend defaults. `speed` times the jitted sampler
(tokens, and tokens + decoding with a ch=32 tokenizer) on the local backend with random weights, after
one warm-up call.
Record: docs/PERFORMANCE.md, the sampler memory and CPU speed tables of both masks, measured at
commit aefe9ca.
"""
import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp

from srdd_jax.convert import var_transformer, var_vqvae
from srdd_jax.diffusion.filtering import SamplerConfig
from srdd_jax.diffusion.sampler import Sampler
from srdd_jax.parallel.compile import inference_compiler_options, jit_inference
from srdd_jax.tokenizer.api import Tokenizer, unbox
from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.transformer.config import VARConfig, preset
from srdd_jax.transformer.model import VAR


def memory(var_config: VARConfig, batch: int, sc: SamplerConfig, options=None) -> dict:
  vae_config = VQVAEConfig(patch_nums=var_config.patch_nums)
  vae_params = var_vqvae.unbox(var_vqvae.abstract_params(vae_config))
  params = var_transformer.abstract_params(var_config)
  out = {}
  for mask in ('causal', 'markov'):
    s = Sampler(var_config, vae_config, sc, mask=mask)
    fn = jax.jit(s.tokens)
    compiled = fn.lower(params, vae_params, jax.ShapeDtypeStruct((batch,), jnp.int32),
                        jax.ShapeDtypeStruct((2,), jnp.uint32)).compile(compiler_options=options)
    m = compiled.memory_analysis()
    out[mask] = {'arguments': m.argument_size_in_bytes, 'outputs': m.output_size_in_bytes,
                 'temporaries': m.temp_size_in_bytes,
                 'total': m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes}
  out['causal_over_markov'] = out['causal']['total'] / out['markov']['total']
  return out


def speed(var_config: VARConfig, batch: int, sc: SamplerConfig, repeats: int, options: bool = True) -> dict:
  vae_config = VQVAEConfig(ch=32, patch_nums=var_config.patch_nums)
  vae_params = unbox(Tokenizer(vae_config).init(jax.random.PRNGKey(1)))
  x = jnp.zeros((1, var_config.seq_len - 1, var_config.z_channels))
  params = unbox(VAR(var_config).init(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32), x)['params'])
  labels = jnp.arange(batch) % var_config.num_classes
  out = {}
  for mask in ('causal', 'markov'):
    s = Sampler(var_config, vae_config, sc, mask=mask)
    jit = jit_inference if options else jax.jit
    tokens = jit(s.tokens)
    full = jit(s.sample)
    res = {}
    for name, fn in (('tokens', tokens), ('tokens_and_decode', full)):
      jax.block_until_ready(fn(params, vae_params, labels, jax.random.PRNGKey(0)))  # Compile, warm up.
      times = []
      for r in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(params, vae_params, labels, jax.random.PRNGKey(r + 1)))
        times.append(time.perf_counter() - t)
      best = min(times)
      res[name] = {'seconds_per_batch_best': round(best, 4), 'images_per_s': round(batch / best, 2),
                   'seconds_all': [round(t, 4) for t in times]}
    out[mask] = res
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('what', choices=['memory', 'speed'])
  ap.add_argument('--preset', default='d16')
  ap.add_argument('--depth', type=int, default=4)
  ap.add_argument('--width', type=int, default=256)
  ap.add_argument('--batch', type=int, default=0)
  ap.add_argument('--dtype', default='float32')
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--default_compiler_options', action='store_true',
                  help='speed: compile without inference_compiler_options()')
  args = ap.parse_args()
  sc = SamplerConfig(cfg=1.5, top_k=900, top_p=0.96)
  info = {'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind, 'sampler': dataclasses.asdict(sc)}
  if args.what == 'memory':
    # The analysis stands for an accelerator's program, so top-k takes the accelerators' form there (on
    # the CPU 'auto' would sort-free filter, with its (rows, vocabulary) temporaries).
    sc = dataclasses.replace(sc, top_k_impl='sort')
    info['sampler'] = dataclasses.asdict(sc)
    cfg = preset(args.preset, dtype=args.dtype)
    info.update(preset=args.preset, batch=args.batch or 32, dtype=args.dtype,
                compiler_options=inference_compiler_options(),
                result=memory(cfg, args.batch or 32, sc, inference_compiler_options()))
    if inference_compiler_options():  # What the backend's default options would give.
      info['result_default_compiler_options'] = memory(cfg, args.batch or 32, sc)
  else:
    cfg = VARConfig(depth=args.depth, width=args.width, num_heads=max(1, args.width // 64), num_classes=10,
                    dtype=args.dtype)
    info.update(depth=args.depth, width=args.width, batch=args.batch or 16, dtype=args.dtype,
                compiler_options=None if args.default_compiler_options else inference_compiler_options(),
                result=speed(cfg, args.batch or 16, sc, args.repeats, not args.default_compiler_options))
  print(json.dumps(info, indent=1))


if __name__ == '__main__':
  main()
