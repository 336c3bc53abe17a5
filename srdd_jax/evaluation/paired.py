"""Paired comparisons of two sampling protocols or models run on shared seeds.

A study that runs every variant on the same (training seed, sampling seed) keys compares two variants
by the differences of their runs key by key: the seeds' shared noise cancels, which the unpaired rule
(|difference of means| against the runs' spread) ignores. Each comparison gives the mean difference
with its 95% confidence interval (Student t over the pairs) and a verdict that says whether the
interval is narrow enough to decide anything: a comparison whose half-width exceeds the resolution
(a fraction of the baseline's value, chosen by the study) is "not decisive", never "no difference".
"""
from __future__ import annotations

import math

import numpy as np
import scipy.stats

CONFIDENCE = 0.95


def run_key(run: dict) -> tuple[int, int]:
  """(training seed, sampling seed) of one run."""
  return int(run['train_seed']), int(run['sampling_seed'])


def paired_difference(x_runs, y_runs, metric: str, key=run_key) -> dict:
  """x - y on `metric` over the keys both have: n, mean, sd, the 95% interval and its half-width
  (None with fewer than 2 pairs: no interval), how many pairs went each way, and how many runs of each
  side found no partner. Two runs of one side with the same key, or a run without `metric`, are errors:
  either would silently change what is paired."""
  def by_key(runs, side):
    out = {}
    for r in runs:
      if r.get(metric) is None:
        raise ValueError(f'paired_difference: a run of {side} has no {metric!r} (key {key(r)})')
      if key(r) in out:
        raise ValueError(f'paired_difference: two runs of {side} share the key {key(r)}')
      out[key(r)] = float(r[metric])
    return out
  x, y = by_key(x_runs, 'x'), by_key(y_runs, 'y')
  keys = sorted(set(x) & set(y))
  d = np.asarray([x[k] - y[k] for k in keys], np.float64)
  out = {'metric': metric, 'n': len(keys), 'keys': [list(k) for k in keys], 'differences': d.tolist(),
         'mean': float(d.mean()) if len(d) else None, 'sd': None, 'ci': None, 'half_width': None,
         'x_lower': int((d < 0).sum()), 'x_higher': int((d > 0).sum()), 'confidence': CONFIDENCE,
         'unpaired': [len(set(x) - set(y)), len(set(y) - set(x))]}
  if len(d) >= 2:
    sd = float(d.std(ddof=1))
    half = float(scipy.stats.t.ppf(0.5 + CONFIDENCE / 2, len(d) - 1)) * sd / math.sqrt(len(d))
    out.update(sd=sd, half_width=half, ci=[out['mean'] - half, out['mean'] + half])
  return out


def verdict(diff: dict, resolution: float, lower_is_better: bool = True) -> dict:
  """Reads a paired difference x - y: decisive when its interval's half-width is at most `resolution`;
  then x is better or worse when the interval excludes 0, or equivalent (the difference at most the
  interval's farther end from 0)."""
  half = diff['half_width']
  if half is None:
    return {'decisive': False, 'direction': None, 'text': 'not decisive (fewer than 2 pairs)'}
  lo, hi = diff['ci']
  word = None
  if lo > 0 or hi < 0:
    word = 'better' if (hi < 0) == lower_is_better else 'worse'
  if not half <= resolution:
    # Too wide to decide at the study's resolution; a sign the interval does show is still said.
    side = f'; the interval lies on the {word} side of 0' if word else ''
    return {'decisive': False, 'direction': word,
            'text': f'not decisive (half-width {half:.4g} > resolution {resolution:.4g}{side})'}
  if word:
    return {'decisive': True, 'direction': word,
            'text': f'{word} by {abs(diff["mean"]):.4g} (decisive: 95% CI [{lo:.4g}, {hi:.4g}])'}
  # The interval holds 0: the difference is at most its farther end, up to twice the half-width.
  bound = max(abs(lo), abs(hi))
  return {'decisive': True, 'direction': 'equivalent',
          'text': f'equivalent: |difference| <= {bound:.4g} (decisive: 95% CI [{lo:.4g}, {hi:.4g}] holds 0)'}
