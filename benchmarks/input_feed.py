"""Keeping the chips fed, measured on CPU processes: one code tree against another, in one sitting.

  python benchmarks/input_feed.py --before=/tmp/old_checkout --out=docs/pod/input_feed.json

Two measurements, each run for the tree under test (`--after`, default this checkout) and for `--before`,
interleaved (before, after, before, after, ...) so that both meet the same machine load; medians reported:

  input   images/s one host's reader delivers: a folder of PNGs (`--size` px, decoded, resized, cropped to
          `--image_size`), the rows of host 0 of `--hosts` in a global batch of `--batch`, as training
          asks for them (the tree's own iterator; the after tree's as uint8, as it sends them).
  train   the users' command, `--mode=train_tokenizer` on that folder, as `--hosts` processes of 4 CPU
          devices each (launch/local.sh): seconds per step (from metrics.jsonl, the first log interval
          left out as compile time), and host wait, the seconds per step process 0 spends blocked in
          jax.device_get (timed around it from outside the tree, the same way for both trees).

Timings are ratios of one sitting: the record holds the measured float32 matmul peak and the load
average beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# Process 0's device_get time, measured the same way whatever the tree: the worker times jax.device_get
# and hands over to the tree's own main.
_TRAIN_WORKER = r'''
import atexit, json, os, sys, time
import jax
spent = {'seconds': 0.0, 'calls': 0}
_get = jax.device_get
def timed(x):
  t = time.perf_counter()
  try:
    return _get(x)
  finally:
    spent['seconds'] += time.perf_counter() - t
    spent['calls'] += 1
jax.device_get = timed
atexit.register(lambda: open(os.environ['FEED_WAIT_OUT'] + os.environ['SRDD_PROCESS_ID'], 'w').write(json.dumps(spent)))
from absl import app
from srdd_jax import main
sys.argv = ['srdd_jax.main'] + sys.argv[1:]
app.run(main.main, flags_parser=main._parse_flags)
'''

_INPUT_WORKER = r'''
import inspect, json, os, sys, time
from srdd_jax.data import pipeline
folder, image_size, batch, hosts, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
source = pipeline.build_source({'source': 'folder', 'path': folder, 'labels': 'none'}, image_size, train=True)
rows = pipeline.rows_for_process(batch, 0, hosts)
kwargs = {'raw': True} if 'raw' in inspect.signature(source.iterator).parameters else {}
it = source.iterator(0, 0, batch, rows, **kwargs)
first = next(it)
for _ in range(2):  # Warm-up: threads started, the first batches' prefetch drained.
  next(it)
t = time.perf_counter()
for _ in range(batches):
  images, _ = next(it)
dt = time.perf_counter() - t
print(json.dumps({'images_per_s': batches * len(images) / dt, 'dtype': str(images.dtype),
                  'bytes_per_image': int(images[0].nbytes)}), flush=True)
os._exit(0)  # tf.data's threads (the before tree) can hang the interpreter's exit.
'''


def make_folder(path: str, n: int, size: int) -> None:
  """`n` PNGs of `size` px with photo-like detail (smooth gradients plus noise), so decoding costs."""
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:size, 0:size] / size
  for i in range(n):
    base = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy))], -1) * 90 + 128
    image = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(os.path.join(path, f'{i:05d}.png'))


def input_rate(tree: str, folder: str, a) -> dict:
  out = subprocess.run([sys.executable, '-c', _INPUT_WORKER, folder, str(a.image_size), str(a.batch), str(a.hosts),
                        str(a.batches)], cwd=tree, env=dict(os.environ, PYTHONPATH=tree, JAX_PLATFORMS='cpu'),
                       capture_output=True, text=True, check=True, timeout=1800)
  return json.loads(out.stdout.strip().splitlines()[-1])


def train(tree: str, folder: str, a, work: str) -> dict:
  wait_out = os.path.join(work, 'wait_')
  logs = os.path.join(work, 'logs')
  worker = os.path.join(work, 'worker.py')
  with open(worker, 'w') as f:
    f.write(_TRAIN_WORKER)
  steps = a.log_every * (a.logs + 1)
  args = ['--config=configs/tokenizer_smoke.py', '--mode=train_tokenizer', f'--workdir={work}/run',
          '--config.data.source=folder', f'--config.data.path={folder}', '--config.data.labels=none',
          '--config.tokenizer_train.eval_path=' + folder, '--config.tokenizer_train.eval_every=0',
          f'--config.tokenizer_train.steps={steps}', f'--config.tokenizer_train.log_every={a.log_every}',
          f'--config.tokenizer_train.checkpoint_every={steps}', f'--config.tokenizer_train.global_batch={a.batch}',
          '--config.tokenizer_train.prefetch=True', '--config.tokenizer_train.gan_start_step=100000']
  # local.sh runs `$PYTHON -m srdd_jax.main`: a wrapper script runs the timed worker instead.
  shim = os.path.join(work, 'python')
  with open(shim, 'w') as f:
    f.write(f'#!/bin/bash\n[ "$1" = -m ] && [ "$2" = srdd_jax.main ] && shift 2 && exec {sys.executable} {worker} "$@"\n'
            f'exec {sys.executable} "$@"\n')
  os.chmod(shim, 0o755)
  env = dict(os.environ, PYTHONPATH=tree, PYTHON=shim, FEED_WAIT_OUT=wait_out)
  env.pop('XLA_FLAGS', None)
  t = time.time()
  r = subprocess.run(['bash', os.path.join(tree, 'launch', 'local.sh'), str(a.hosts), '4', logs, '--', *args],
                     cwd=tree, env=env, capture_output=True, text=True, timeout=3600, check=False)
  if r.returncode:
    log = open(os.path.join(logs, 'process_0.log')).read()[-3000:]
    raise RuntimeError(f'training in {tree} failed ({r.returncode}): {r.stderr[-2000:]}\n{log}')
  recs = [json.loads(x) for x in open(_find(os.path.join(work, 'run'), 'metrics.jsonl')) if x.strip()]
  logged = [x for x in recs if 'steps_per_s' in x]
  steady = logged[1:]  # The first interval holds the compile.
  seconds_per_step = statistics.median(1 / x['steps_per_s'] for x in steady)
  spent = json.load(open(wait_out + '0'))
  return {'seconds_per_step': seconds_per_step, 'device_get_s_total': spent['seconds'],
          'device_get_calls': spent['calls'], 'steps': steps, 'wall_s': time.time() - t,
          'host_wait_s_per_step_logged': [x.get('host_wait_s') for x in steady]}


def _find(root: str, name: str) -> str:
  for d, _, names in os.walk(root):
    if name in names:
      return os.path.join(d, name)
  raise FileNotFoundError(f'{name} under {root}')


def matmul_peak() -> float:
  out = subprocess.run([sys.executable, '-c', 'from srdd_jax.parallel.compile import measured_matmul_peak as m; '
                        'import jax.numpy as jnp; print(m(jnp.float32))'], cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
                       check=True)
  return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--before', required=True, help='a checkout of the code before the change')
  ap.add_argument('--after', default=REPO, help='the checkout under test (default: this one)')
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--hosts', type=int, default=2)
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--size', type=int, default=256, help='the PNGs\' side in px')
  ap.add_argument('--image_size', type=int, default=16, help="the tokenizer's input (tokenizer_smoke: 16)")
  ap.add_argument('--images', type=int, default=512)
  ap.add_argument('--batches', type=int, default=20)
  ap.add_argument('--log_every', type=int, default=10)
  ap.add_argument('--logs', type=int, default=3, help='log intervals measured after the first')
  ap.add_argument('--skip_train', action='store_true')
  ap.add_argument('--out', default='')
  a = ap.parse_args(argv)
  trees = {'before': os.path.abspath(a.before), 'after': os.path.abspath(a.after)}
  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, 'images')
    make_folder(folder, a.images, a.size)
    results = {k: {'input': [], 'train': []} for k in trees}
    for r in range(a.rounds):
      for name, tree in trees.items():
        results[name]['input'].append(input_rate(tree, folder, a))
        print(f'round {r} {name} input: {results[name]["input"][-1]}', flush=True)
      if not a.skip_train:
        for name, tree in trees.items():
          work = os.path.join(tmp, f'{name}_{r}')
          os.makedirs(work)
          results[name]['train'].append(train(tree, folder, a, work))
          print(f'round {r} {name} train: {results[name]["train"][-1]}', flush=True)
  summary = {}
  for name, res in results.items():
    s = {'images_per_s_per_host': statistics.median(x['images_per_s'] for x in res['input']),
         'bytes_per_image_sent': res['input'][0]['bytes_per_image'], 'dtype_sent': res['input'][0]['dtype']}
    if res['train']:
      s['seconds_per_step'] = statistics.median(x['seconds_per_step'] for x in res['train'])
      s['host_wait_s_per_step'] = statistics.median(x['device_get_s_total'] / x['steps'] for x in res['train'])
    summary[name] = s
  record = {'command': 'python benchmarks/' + os.path.basename(__file__) + ' ' + ' '.join(sys.argv[1:]),
            'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'cpu_cores': os.cpu_count(),
            'load_average': os.getloadavg(), 'matmul_peak_flops_f32': matmul_peak(), 'settings': vars(a),
            'summary': summary, 'runs': results}
  print(json.dumps(summary, indent=1))
  if a.out:
    with open(a.out, 'w') as f:
      json.dump(record, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
