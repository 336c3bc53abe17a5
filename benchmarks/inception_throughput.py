"""Throughput of FID Inception feature extraction (images/s) on the local backend.

  python -m benchmarks.inception_throughput [--batch 64] [--image_size 256] [--batches 3] [--repeats 3]
                                            [--extract_only]

Random weights: the work of a forward pass does not depend on the weight values, so the throughput is
that of the published weights; no metric is computed from these features. Two numbers, each the best
of --repeats after one warm-up call:
  network: the jitted function (uint8 -> bilinear 299 -> Inception -> pool3, logits) on a batch
           already on the device;
  extract: `srdd_jax.evaluation.inception.extract` on --batches x --batch host uint8 images, with the
           host-to-device copies and the features brought back as NumPy.
`network` is timed with the default XLA options and with the CPU options `extract` uses
(srdd_jax/parallel/compile.py: XLA:CPU's YNN fusion off). On a shared machine the wall times vary with
the other jobs; the process CPU seconds of the best repeat are printed beside them.
Record: docs/PERFORMANCE.md, "FID Inception feature extraction on the 2-core CPU", measured at
commit efe977d.
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from srdd_jax.evaluation import inception
from srdd_jax.parallel.compile import inference_compiler_options


def _best(fn, repeats):
  """(best wall seconds, all wall seconds, CPU seconds of the process in the best repeat)."""
  fn()  # Compile and warm up.
  times, cpu = [], []
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    fn()
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  i = min(range(repeats), key=times.__getitem__)
  return times[i], times, cpu[i]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--batch', type=int, default=64)
  ap.add_argument('--image_size', type=int, default=256)
  ap.add_argument('--batches', type=int, default=3, help='batches per extract() call')
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--extract_only', action='store_true', help='time extract() only')
  args = ap.parse_args()

  params = inception.init_params(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  shape = (args.batch, args.image_size, args.image_size, 3)
  host = rng.integers(0, 256, (args.batches * args.batch,) + shape[1:], dtype=np.uint8)
  dev = jnp.asarray(host[:args.batch])
  model = inception.FIDInceptionV3()

  def features(p, x):
    pool3, logits = model.apply({'params': p}, inception.preprocess(x))
    return {'pool3': pool3, 'logits': logits}

  info = {'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind,
          'weights': 'random (throughput does not depend on weight values)',
          'batch': args.batch, 'image_size': args.image_size, 'input': 'uint8 NHWC',
          'precision': 'highest', 'result': {}}
  for name, opts in (('default_options', None), ('inference_options', inference_compiler_options())):
    if args.extract_only or (name == 'inference_options' and opts is None):
      continue
    fn = jax.jit(features, compiler_options=opts) if opts else jax.jit(features)
    t0 = time.perf_counter()
    fn.lower(params, dev).compile()
    compile_s = time.perf_counter() - t0
    best, times, cpu = _best(lambda: jax.block_until_ready(fn(params, dev)), args.repeats)
    info['result'][name] = {'compile_s': round(compile_s, 2), 'network_s_per_batch': round(best, 3),
                            'network_images_per_s': round(args.batch / best, 2),
                            'network_s_all': [round(t, 3) for t in times],
                            'network_cpu_s_per_batch': round(cpu, 2)}
  # extract() compiles with inference_compiler_options() (plain jax.jit off CPU).
  best, times, cpu = _best(lambda: inception.extract(params, host, batch_size=args.batch), args.repeats)
  info['result']['extract'] = {'images': len(host), 's_best': round(best, 3),
                               'images_per_s': round(len(host) / best, 2),
                               's_all': [round(t, 3) for t in times], 'cpu_s_best': round(cpu, 2),
                               'cpus': os.cpu_count()}
  print(json.dumps(info, indent=1))


if __name__ == '__main__':
  main()
