"""Training curves of two settings, paired by training seed: is a change inside the seed noise?

  python -m benchmarks.paired_curves --root DIR --token_cache DIR [--config configs/fashion_mnist.py]
      [--seeds 0,1,2,3] [--steps 600] [--windows 3] [--a model.cpu_matmul=float32]
      [--b model.cpu_matmul=bfloat16] [--out FILE.json]

Each (arm, training seed) trains the config's transformer for `--steps` steps on the token cache
(`python -m srdd_jax.main --mode=train`, the arm's keys set, workdir ROOT/<arm>_<seed>); a run already
finished is read, a stopped one resumes (its checkpoints), so the command can be repeated after an
interruption. Both arms of a seed see the same batches in the same order (same seed, same cache), so
the training loss at a step differs between them only by the change and what it does to the weights.

Report: the steps are cut into `--windows` equal windows; per run, the mean logged training loss of each
window; per window, the paired difference b - a averaged per training seed with its 95% t interval over
seeds (srdd_jax.evaluation.paired.t_interval) beside the between-seed standard deviation of each arm
(the seed noise); and the median steps/s of each arm (the runs' own records: load-dependent, a note, not
a benchmark). "Within seed noise" where the whole interval lies inside +-1 between-seed sd of arm a.
Record: docs/PERFORMANCE.md (issue 45 line 1).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

from srdd_jax.evaluation.paired import t_interval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def records(workdir: str) -> dict:
  """{step: record} of the run's logged training steps (the last record of a step wins: a resumed run
  may log a step twice)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return {}
  out = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        r = json.loads(line)
        if 'loss' in r and 'step' in r:
          out[int(r['step'])] = r
  return out


def train(a, arm: str, keys, seed: int) -> dict:
  workdir = os.path.join(a.root, f'{arm}_{seed}')
  recs = records(workdir)
  if recs and max(recs) >= a.steps:
    return recs
  cmd = [sys.executable, '-m', 'srdd_jax.main', f'--config={a.config}', f'--workdir={workdir}', '--mode=train',
         f'--config.data.token_cache={a.token_cache}', f'--config.seed={seed}', f'--config.train.steps={a.steps}',
         f'--config.train.log_every={a.log_every}', f'--config.train.checkpoint_every={a.steps // 2}',
         *[f'--config.{k}' for k in keys]]
  print(f'training {arm} seed {seed}: {" ".join(cmd[3:])}', flush=True)
  with open(workdir + '.log', 'a') as log:
    p = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  if p.returncode:
    raise SystemExit(f'error: {arm} seed {seed} exited {p.returncode}; its log: {workdir}.log')
  return records(workdir)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--root', required=True)
  ap.add_argument('--token_cache', required=True)
  ap.add_argument('--config', default='configs/fashion_mnist.py')
  ap.add_argument('--seeds', default='0,1,2,3')
  ap.add_argument('--steps', type=int, default=600)
  ap.add_argument('--log_every', type=int, default=10)
  ap.add_argument('--windows', type=int, default=3)
  ap.add_argument('--a', action='append', default=None, help='SECTION.KEY=VALUE of arm a (repeatable)')
  ap.add_argument('--b', action='append', default=None, help='SECTION.KEY=VALUE of arm b (repeatable)')
  ap.add_argument('--out', default='')
  a = ap.parse_args(argv)
  arms = {'a': a.a or ['model.cpu_matmul=float32'], 'b': a.b or ['model.cpu_matmul=bfloat16']}
  try:
    seeds = [int(s) for s in a.seeds.split(',')]
  except ValueError:
    raise SystemExit(f'error: --seeds={a.seeds!r}: comma-separated integers') from None
  if len(seeds) < 2 or a.steps < a.windows * a.log_every or a.windows < 1:
    raise SystemExit('error: need >= 2 seeds and --steps >= --windows x --log_every')
  os.makedirs(a.root, exist_ok=True)
  runs = {(arm, s): train(a, arm, arms[arm], s) for s in seeds for arm in arms}
  steps = sorted(set.intersection(*[set(r) for r in runs.values()]))
  edges = [round(a.steps * i / a.windows) for i in range(a.windows + 1)]
  windows = []
  for lo, hi in zip(edges, edges[1:]):
    at = [s for s in steps if lo < s <= hi]
    mean = {k: statistics.mean(r[s]['loss'] for s in at) for k, r in runs.items()}
    d = [mean['b', s] - mean['a', s] for s in seeds]
    _, half = t_interval(d)
    m = statistics.mean(d)
    sd_a = statistics.stdev(mean['a', s] for s in seeds)
    sd_b = statistics.stdev(mean['b', s] for s in seeds)
    windows.append({'steps': [lo + 1, hi], 'logged_steps': len(at),
                    'a': [mean['a', s] for s in seeds], 'b': [mean['b', s] for s in seeds],
                    'b_minus_a_per_seed': d, 'mean': m, 'ci': [m - half, m + half],
                    'seed_sd_a': sd_a, 'seed_sd_b': sd_b,
                    'within_seed_noise': bool(abs(m) + half <= sd_a)})
  rates = {arm: statistics.median(r[s]['steps_per_s'] for (k, _), r in runs.items() if k == arm for s in r
                                  if 'steps_per_s' in r[s]) for arm in arms}
  out = {'schema': 'srdd_jax.paired_curves/1', 'config': a.config, 'arms': arms, 'seeds': seeds,
         'steps': a.steps, 'token_cache': a.token_cache, 'windows': windows, 'median_steps_per_s': rates}
  for w in windows:
    print(f"| {w['steps'][0]}-{w['steps'][1]} | a {statistics.mean(w['a']):.4f} (seed sd {w['seed_sd_a']:.4f}) | "
          f"b {statistics.mean(w['b']):.4f} (seed sd {w['seed_sd_b']:.4f}) | b - a {w['mean']:+.4f} "
          f"[{w['ci'][0]:+.4f}, {w['ci'][1]:+.4f}] | {'within' if w['within_seed_noise'] else 'NOT within'} seed noise |")
  print(f"median steps/s: a {rates['a']:.2f}, b {rates['b']:.2f} (the runs' own records)")
  if a.out:
    with open(a.out, 'w') as f:
      json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()
