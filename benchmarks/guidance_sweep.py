"""Proxy quality of one trained transformer over a grid of sampler settings (guidance, top-p, MR).

  python -m benchmarks.guidance_sweep --workdir DIR [--which train] [--cfg 0,1,2,3,5] \
      [--schedules linear,constant] [--top_p 0.96] [--mr off,redraw] [--per_class 100] [--seed 1000]

DIR is a finished `--mode=all` (or `--mode=train`) workdir of configs/fashion_mnist.py: its tokenizer
(DIR/tokenizer/params, else the config's, unless --tokenizer) and its last exported model (DIR/export/step_*). Every setting is sampled with
the same seed by one compiled program per top-p and MR setting (guidance is a traced argument, as in the
study), and scored with the proxy classifier (`fd_cnn_fashion_mnist_32px`, never an FID) against real
images of --which: `train` to choose a setting, `test` only to report the chosen one. One JSON line per
setting, then a table sorted by fd.
Record: docs/RESULTS.md, the guidance tables of workdir/demo_base (commit e1d036b) and workdir/exp1
(commit 8b934e2).
"""
from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import sys
import time

from configs import fashion_mnist
from srdd_jax.config import floats
from srdd_jax.diffusion.filtering import PROTOCOLS
from srdd_jax.study import plan
from srdd_jax.study.scoring import Scorer


def _latest_export(workdir):
  exports = sorted(glob.glob(os.path.join(workdir, 'export', 'step_*')))
  if not exports:
    return None
  return exports[-1]


def _override(config, assignment):
  """`--set model.dtype=float32`: the sampler of a run trained with command-line overrides."""
  key, sep, text = assignment.partition('=')
  *parents, leaf = key.split('.')
  node = config
  try:
    for name in parents:
      node = node[name]
    old = node[leaf]
  except KeyError as e:
    raise ValueError(f'--set {assignment!r}: no config key {key!r}') from e
  if not sep:
    raise ValueError(f'--set {assignment!r}: expected KEY=VALUE')
  try:
    node[leaf] = ast.literal_eval(text) if isinstance(old, (bool, tuple)) else type(old)(text)
  except (ValueError, SyntaxError) as e:
    raise ValueError(f'--set {assignment!r}: {text!r} is not a valid {type(old).__name__}') from e


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--tokenizer', default='')
  p.add_argument('--model', default='')
  p.add_argument('--which', default='train', choices=('train', 'test'))
  p.add_argument('--cfg', default='0,1,1.5,2,3,5')
  p.add_argument('--schedules', default='linear,constant')
  p.add_argument('--top_p', default='')
  p.add_argument('--mr', default='off', help="comma-separated: off, redraw, refine")
  p.add_argument('--per_class', type=int, default=100)
  p.add_argument('--seed', type=int, default=1000)
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='a configs/fashion_mnist.py override the run was trained with, e.g. model.dtype=float32')
  p.add_argument('--out', default='')
  a = p.parse_args(argv)
  c = fashion_mnist.get_config()
  for assignment in a.set:
    try:
      _override(c, assignment)
    except ValueError as e:
      p.error(str(e))
  c.eval.batch_size = 100
  tok = a.tokenizer or os.path.join(a.workdir, 'tokenizer', 'params')
  if not a.tokenizer and not os.path.isdir(tok):  # A run on the tokenizer the config names (the carried one).
    tok = c.tokenizer.checkpoint
  export = a.model or _latest_export(a.workdir)
  if not export:
    p.error(f'--workdir={a.workdir}: no export/step_* (a finished --mode=train or --mode=all); or give --model')
  top_ps = floats(a.top_p, '--top_p') or [float(c.sampler.top_p)]
  rows = []
  for top_p in top_ps:
    c.sampler.top_p = top_p
    scorer = Scorer(c, a.workdir, tok)
    for mr in a.mr.split(','):
      for schedule in a.schedules.split(','):
        for cfg in floats(a.cfg, '--cfg'):
          if cfg == 0 and schedule != a.schedules.split(',')[0]:
            continue  # Strength 0 is the same sampler under every schedule.
          srdd = PROTOCOLS['srdd']  # SRDD's masked resampling, 0.01 x 10, in mode `mr`.
          values = plan.sampler_values(schedule, cfg, None if mr == 'off' else {
              'mr_mode': mr, 'mr_threshold': srdd['mr_threshold'], 'mr_iterations': srdd['mr_iterations']})
          t0 = time.time()
          s = scorer.score(export, values, a.per_class, a.seed, a.which)
          row = {'top_p': top_p, 'mr': mr, 'schedule': schedule, 'cfg': cfg, 'fd': s['fd'],
                 'class_consistency': s['class_consistency'], 'fd_name': s['fd_name'],
                 'real_split': a.which, 'n': s['num_samples'], 'seconds': round(time.time() - t0, 1)}
          rows.append(row)
          print(json.dumps(row), flush=True)
  if a.out:
    with open(a.out, 'w') as f:
      json.dump(rows, f, indent=1)
  print(f'\n| top-p | MR | schedule | cfg | {rows[0]["fd_name"]} ({a.which}) | class consistency |')
  print('|---|---|---|---|---|---|')
  for r in sorted(rows, key=lambda r: r['fd']):
    print(f'| {r["top_p"]:g} | {r["mr"]} | {r["schedule"]} | {r["cfg"]:g} | {r["fd"]:.2f} | '
          f'{r["class_consistency"]:.3f} |')
  return rows


if __name__ == '__main__':
  sys.exit(0 if main() else 1)
