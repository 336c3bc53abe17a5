"""The order of a study's work: the plan logged; the tokenizer and token caches; then per training seed
its models (starts and teachers first) and every arm on them, so that each seed's (arm, seed) summaries
are complete before the next seed begins; a timing per arm; the report."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from srdd_jax.config import with_defaults
from srdd_jax.diffusion.filtering import PROTOCOLS
from srdd_jax.parallel import compile_cache
from srdd_jax.study import plan as study_plan
from srdd_jax.study import report
from srdd_jax.study.units import Stages, Stopped, Work


def git_commit() -> str:
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=10,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or 'unknown'
  except (OSError, subprocess.SubprocessError):
    return 'unknown'


def protocol(config, o: dict) -> dict:
  """What every arm shares, for study.json and study.md."""
  return {'train_seeds': list(o['train_seeds']), 'sample_seeds': list(o['sample_seeds']),
          'training_steps': int(config.train.steps), 'steps': o['steps'], 'arms': [a.key for a in o['arms']],
          'cfg_grid': list(o['cfg_grid']), 'schedules': list(o['schedules']),
          'mr_thresholds': list(o['mr_thresholds']), 'mr_iterations': list(o['mr_iterations']),
          'truncations': list(o['truncations']), 'val_per_class': o['val_per_class'],
          'test_per_class': o['test_per_class'], 'validation_seed': study_plan.VALIDATION_SEED,
          'var_protocol': dict(PROTOCOLS['var']), 'srdd_protocol': dict(PROTOCOLS['srdd']),
          'top_k': int(config.sampler.top_k), 'top_p': float(config.sampler.top_p), 'data': config.data.source,
          'selection_rule': 'per training seed, the lowest validation fd (val_per_class per class, the validation '
                            'seed, training-split reals) over the arm\'s guidance grid x its search; ties: the '
                            'smaller strength, then the earlier setting'}


def run(config, workdir: str, stages: Stages) -> dict:
  config = with_defaults(config)
  try:
    return _run(config, workdir, stages)
  except Stopped as e:
    s = e.summary
    return {'stopped_by': s.get('stopped_by') or 'request', 'complete': False, 'stage': s.get('stage'),
            'end_step': s.get('end_step')}


def _run(config, workdir: str, stages: Stages) -> dict:
  t0 = time.time()
  o = study_plan.options(config)
  p = study_plan.plan(config)
  study_plan.log_plan(p, compile_cache.ensure(workdir))
  progress = study_plan.Progress(p)
  work = Work(config, workdir, stages, o, progress)
  work.prepare()
  first = {}  # Arm -> its summary on the first training seed, whose sampler is timed.
  for seed in o['train_seeds']:
    done = {}
    for model in o['models']:
      done[model.name] = work.model(model, seed, done)
    for arm in o['arms']:
      summary = work.arm(arm, seed, done[arm.model])
      first.setdefault(arm.key, summary)
  for arm in o['arms']:
    work.cost(arm, first[arm.key]['export'], first[arm.key]['sampler'])
  ran = work.units.ran + [prefix + u for prefix, units in work.arm_units for u in units.ran]
  kept = len(work.units.kept) + sum(len(units.kept) for _, units in work.arm_units)
  # A model's checkpoints are timed inside its unit: counted once.
  seconds = {u: t for u, t in work.units.seconds.items() if not u.endswith('/checkpoints')}
  seconds.update({prefix + u: t for prefix, units in work.arm_units for u, t in units.seconds.items()})
  group = lambda g: round(sum(t for u, t in seconds.items() if u.split('/')[0] == g), 1)
  extra = {'command': ' '.join(sys.argv) if sys.argv else '', 'commit': git_commit(),
           'quick': bool(config.ablation.quick), 'protocol': protocol(config, o), 'plan': p,
           'rates': progress.rates(),
           'unit_seconds': {'total': round(sum(seconds.values()), 1),
                            **{g: group(g) for g in sorted({u.split('/')[0] for u in seconds})}}}
  out = report.write(workdir, extra, arms={a.key for a in o['arms']}, train_seeds=set(o['train_seeds']))
  # What main prints: the headline numbers and where the rest is.
  return {'outputs': out['outputs'], 'quick': extra['quick'], 'seconds': round(time.time() - t0, 1),
          'units_run': ran, 'units_kept': kept,
          'arms': {k: {'fd_mean': t['fd']['mean'], 'fd_sd_over_train_seeds': t['fd']['sd'], 'n': t['fd']['n'],
                       'class_consistency_mean': t['class_consistency']['mean']} for k, t in out['arms'].items()},
          'report': [f'study: {out["outputs"]["md"]} (the table and every comparison), {out["outputs"]["json"]}, '
                     f'{out["outputs"]["png"]}'] +
                    [f'({c["x"]}) - ({c["ref"]}) fd: {c["fd"]["verdict"]["text"]}' for c in out['comparisons']]}
