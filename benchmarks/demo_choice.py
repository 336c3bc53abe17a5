"""The demo's model and steps for a stage of a given length, from a compute sweep and measured step rates.

  python -m benchmarks.demo_choice --sweep docs/scaling/demo_sweep --rates docs/bench/demo_candidates_X.json
      [--budget_steps 2800] [--out docs/scaling/demo_choice.json]

Inputs: the sweep's points (`python -m srdd_jax.scaling run`: ROOT/plan.json and each point's
metrics.jsonl, whose last held-out record is the point's loss), and one sitting of
benchmarks/demo_candidates.py with `--baseline`: seconds per step of each candidate and of today's recipe
(the baseline). The budget is the baseline's training stage: `--budget_steps` of its steps. For each
candidate depth it gives the steps the budget buys and the held-out loss expected there, from the sweep's
points of that depth: linear in log(steps) between (or beyond) them, the loss of a run trained to that
length (each point is a whole run, its schedule ending at its own last step). The lowest expected loss is
the choice; how far each is extrapolated is printed beside it.
"""
import argparse
import json
import math
import os
import sys


def last_heldout(path: str):
  best = None
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      if 'heldout_loss' in r and (best is None or r['step'] >= best['step']):
        best = r
  return best


def sweep_points(root: str) -> list[dict]:
  with open(os.path.join(root, 'plan.json')) as f:
    plan = json.load(f)
  out = []
  for p in plan['points']:
    m = os.path.join(root, p['name'], 'metrics.jsonl')
    if not os.path.exists(m):
      m = os.path.join(root, 'points', p['name'], 'metrics.jsonl')
    if not os.path.exists(m):
      continue
    r = last_heldout(m)
    if r is None or r['step'] != p['steps']:
      continue
    out.append({**{k: p[k] for k in ('name', 'depth', 'width', 'heads', 'steps', 'params', 'train_flops')},
                'heldout_loss': r['heldout_loss']})
  return out


def expected_loss(points: list[dict], steps: float) -> tuple[float, str]:
  """Loss at `steps` from one depth's points, linear in log(steps); and how it was got."""
  pts = sorted(points, key=lambda p: p['steps'])
  if len(pts) == 1:
    return None, 'one point: not estimated'
  lo, hi = (pts[0], pts[1]) if steps <= pts[1]['steps'] else (pts[-2], pts[-1])
  for a, b in zip(pts, pts[1:]):
    if a['steps'] <= steps <= b['steps']:
      lo, hi = a, b
  x0, x1 = math.log(lo['steps']), math.log(hi['steps'])
  t = (math.log(steps) - x0) / (x1 - x0)
  loss = lo['heldout_loss'] + t * (hi['heldout_loss'] - lo['heldout_loss'])
  if steps < pts[0]['steps'] or steps > pts[-1]['steps']:
    how = f'extrapolated {steps / (pts[-1]["steps"] if steps > pts[-1]["steps"] else pts[0]["steps"]):.2f}x'
  else:
    how = 'interpolated'
  return loss, how


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--sweep', required=True)
  ap.add_argument('--rates', required=True)
  ap.add_argument('--budget_steps', type=int, default=2800, help="today's recipe's training steps")
  ap.add_argument('--out', default='')
  a = ap.parse_args(argv)
  points = sweep_points(a.sweep)
  with open(a.rates) as f:
    rates = json.load(f)
  if 'baseline' not in rates:
    raise SystemExit(f'error: --rates={a.rates!r} has no baseline (run demo_candidates with --baseline)')
  base_s = rates['baseline']['median_s']
  budget_s = a.budget_steps * base_s
  rows = []
  for name, c in rates['candidates'].items():
    same = [p for p in points if (p['depth'], p['width']) == (c['depth'], c['width'])]
    if not same:
      continue
    steps = budget_s / c['median_s']
    loss, how = expected_loss(same, steps)
    rows.append({'candidate': name, 'depth': c['depth'], 'width': c['width'], 'heads': c['heads'],
                 'seconds_per_step': c['median_s'], 'steps_in_budget': int(steps), 'expected_heldout_loss': loss,
                 'how': how, 'sweep_points': {p['steps']: p['heldout_loss'] for p in same}})
  rows.sort(key=lambda r: (r['expected_heldout_loss'] is None, r['expected_heldout_loss'] or 0.0))
  out = {'schema': 'srdd_jax.demo_choice/1', 'budget': {'baseline_seconds_per_step': base_s,
                                                        'baseline_steps': a.budget_steps, 'seconds': budget_s},
         'rates': a.rates, 'sweep': a.sweep, 'rows': rows,
         'choice': rows[0] if rows and rows[0]['expected_heldout_loss'] is not None else None}
  print(f'budget: {a.budget_steps} steps x {base_s:.4f} s (the baseline, {rates["baseline"].get("revision")}) '
        f'= {budget_s:.0f} s of training')
  print('| candidate | s/step | steps in the budget | expected held-out loss | from the sweep |')
  print('|---|---|---|---|---|')
  for r in rows:
    pts = ', '.join(f'{s}: {l:.4f}' for s, l in sorted(r['sweep_points'].items()))
    loss = '-' if r['expected_heldout_loss'] is None else f"{r['expected_heldout_loss']:.4f}"
    print(f"| {r['candidate']} | {r['seconds_per_step']:.4f} | {r['steps_in_budget']} | "
          f"{loss} ({r['how']}) | {pts} |")
  if a.out:
    with open(a.out, 'w') as f:
      f.write(json.dumps(out, indent=1) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
