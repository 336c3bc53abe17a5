"""The train steps of candidate demo models, timed in one sitting: the rates issue 45 line 2 chooses by.

  python -m benchmarks.demo_candidates [--config configs/fashion_mnist.py] [--mask markov]
      [--candidates 3x96x3,4x128x4,5x160x5,6x192x6] [--baseline REV] [--rounds 8] [--steps 5] [--out FILE.json]

Each candidate (depth x width x heads) is the config's train step with only the model changed (batch,
optimiser, data shapes as configured), built the way training builds it by benchmarks/step_ab.py's worker
in a process of its own; the parent lets one worker at a time run `--steps` steps, the candidates in an
order that turns round every round (a drift in the machine's load falls on all alike), and takes the
median over all timed steps. `--baseline REV` times the config's own model as the code and config of
commit REV have it, in the same rounds (today's recipe: its training stage is the budget). The float32
matmul peak is measured before and after. Seconds per step
become the steps a stage of a given length buys (docs/scaling/demo_sweep.md).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

from benchmarks import step_ab


def parse_candidates(text: str):
  out = []
  for item in text.split(','):
    try:
      depth, width, heads = (int(v) for v in item.split('x'))
    except ValueError:
      raise SystemExit(f'error: --candidates item {item!r}: expected DEPTHxWIDTHxHEADS') from None
    if min(depth, width, heads) < 1 or width % heads:
      raise SystemExit(f'error: --candidates item {item!r}: positive, the width a multiple of the heads')
    out.append((depth, width, heads))
  return out


def cpu_model() -> str:
  text = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
  return next((l.split(':', 1)[1].strip() for l in text.splitlines() if l.startswith('Model name')), '')


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--config', default='configs/fashion_mnist.py')
  ap.add_argument('--mask', default='markov')
  ap.add_argument('--candidates', default='3x96x3,4x128x4,5x160x5,6x192x6')
  ap.add_argument('--baseline', default='', help="a commit whose config's model is timed beside (the budget)")
  ap.add_argument('--rounds', type=int, default=8)
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--out', default='')
  a = ap.parse_args(argv)
  if a.rounds < 1 or a.steps < 1:
    raise SystemExit('error: --rounds and --steps must be >= 1')
  cands = parse_candidates(a.candidates)
  peak_before = step_ab.matmul_peak()
  with tempfile.TemporaryDirectory() as tmp:
    tree, commit = step_ab.export('worktree', os.path.join(tmp, 'new'))
    workers = {}
    if a.baseline:
      base_tree, base_commit = step_ab.export(a.baseline, os.path.join(tmp, 'baseline'))
      workers['baseline'] = step_ab.Worker(base_tree, 'config', a.config, a.mask)
    for d, w, h in cands:
      name = f'd{d}_w{w}_h{h}'
      workers[name] = step_ab.Worker(tree, 'config', a.config, a.mask,
                                     [f'model.depth={d}', f'model.width={w}', f'model.heads={h}'])
      print(f'{name}: compiled in {workers[name].info["compile_s"]:.1f}s', file=sys.stderr, flush=True)
    times = {n: [] for n in workers}
    load = []
    names = list(workers)
    for r in range(a.rounds):
      order = names[r % len(names):] + names[:r % len(names)]
      for n in (order if r % 2 == 0 else order[::-1]):
        times[n] += workers[n].run(a.steps)['wall_s']
        load.append(os.getloadavg()[0])
      print(f'round {r + 1}/{a.rounds}', file=sys.stderr, flush=True)
    infos = {n: w.info for n, w in workers.items()}
    for w in workers.values():
      w.close()
  peak_after = step_ab.matmul_peak()
  out = {'schema': 'srdd_jax.demo_candidates/1', 'commit': commit, 'config': a.config, 'mask': a.mask,
         'machine': {'platform': platform.platform(), 'cpus': os.cpu_count(), 'cpu_model': cpu_model()},
         'matmul_peak_flops_per_s': {'before': peak_before, 'after': peak_after}, 'load_1min': load,
         'rounds': a.rounds, 'steps_per_turn': a.steps,
         'candidates': {n: {**infos[n], 'median_s': statistics.median(times[n]), 'wall_s': times[n]}
                        for n in names if n != 'baseline'}}
  if a.baseline:
    out['baseline'] = {**infos['baseline'], 'revision': a.baseline, 'commit': base_commit,
                       'median_s': statistics.median(times['baseline']), 'wall_s': times['baseline']}
  text = json.dumps(out, indent=1)
  if a.out:
    with open(a.out, 'w') as f:
      f.write(text + '\n')
  peak = min(peak_before['flops_per_s'], peak_after['flops_per_s']) / 1e12
  for n in names:
    rec = out['baseline'] if n == 'baseline' else out['candidates'][n]
    print(f'| {n} | {rec["median_s"]:.4f} s/step | peak {peak:.3f} TFLOP/s |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
