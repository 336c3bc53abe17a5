"""Paired comparisons of two arms of a study, by training seed (SPEC §10b).

Two arms that ran on the same (training seed, sampling seed) keys are compared by the differences of
their runs key by key, so the seeds' shared noise cancels. The independent unit is the training seed:
the sampling seeds of one trained model are nested in it and share its luck, so treating every
(training seed, sampling seed) run as an independent pair (a t interval over all runs) makes the
interval too narrow; with 3 training seeds x 3 sampling seeds it has 8 degrees of freedom where the data
have 2. Here each training seed's differences are averaged first, and the 95% interval is a Student t
over the training seeds (n - 1 degrees of freedom).

A verdict reads that interval: "decisive" when it excludes 0 (better or worse); "equivalent" within a
margin (5% of VAR's fd in the study) only when the whole interval lies inside +-margin; otherwise "not
decisive", never "no difference". Two runs are paired only when they share what the comparison takes as
fixed (SHARED: sample count, real split and examples, classifier): a pair that does not is an error.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.stats

CONFIDENCE = 0.95
# What every run of a comparison must share, whichever arm it belongs to: the number of samples, the
# real images' split and count, the classifier whose features the distance is measured in.
SHARED = ('num_samples', 'real_split', 'real_examples', 'proxy_classifier')


def run_key(run: dict) -> tuple[int, int]:
  """(training seed, sampling seed) of one run."""
  return int(run['train_seed']), int(run['sampling_seed'])


def check_shared(x_runs, y_runs, shared=SHARED) -> None:
  """ValueError naming the field and the values when the runs of a comparison differ in one of `shared`
  (or a run lacks it): such runs measure different things and their difference means nothing."""
  for field in shared:
    seen = {}
    for side, runs in (('x', x_runs), ('y', y_runs)):
      for r in runs:
        if field not in r:
          raise ValueError(f'paired_difference: a run of {side} (key {run_key(r)}) has no {field!r}')
        seen.setdefault(repr(r[field]), (side, run_key(r)))
    if len(seen) > 1:
      (a, (sa, ka)), (b, (sb, kb)) = list(seen.items())[:2]
      raise ValueError(f'paired_difference: runs differ in {field!r}: {a} (run {ka} of {sa}) against {b} '
                       f'(run {kb} of {sb}); a comparison pairs runs that share {", ".join(shared)}')


def _by_key(runs, side: str, metric: str) -> dict:
  out = {}
  for r in runs:
    if r.get(metric) is None:
      raise ValueError(f'paired_difference: a run of {side} has no {metric!r} (key {run_key(r)})')
    if run_key(r) in out:
      raise ValueError(f'paired_difference: two runs of {side} share the key {run_key(r)}')
    out[run_key(r)] = float(r[metric])
  return out


def t_interval(values) -> tuple[float | None, float | None]:
  """(sd, half-width of the 95% t interval of the mean) of independent values; (None, None) for fewer
  than 2."""
  v = np.asarray(values, np.float64)
  if len(v) < 2:
    return None, None
  sd = float(v.std(ddof=1))
  return sd, float(scipy.stats.t.ppf(0.5 + CONFIDENCE / 2, len(v) - 1)) * sd / math.sqrt(len(v))


def paired_difference(x_runs, y_runs, metric: str, shared=SHARED) -> dict:
  """x - y on `metric`, by training seed: each training seed's differences over the keys both arms have
  are averaged (per_seed), then mean, sd and the 95% t interval over the n training seeds (None with
  fewer than 2: no interval). Also how many training seeds went each way, the paired runs, and the runs
  of each side without a partner. Duplicate keys, a run without `metric`, or runs that differ in one of
  `shared` are errors: each would silently change what is compared."""
  x, y = _by_key(x_runs, 'x', metric), _by_key(y_runs, 'y', metric)
  check_shared(x_runs, y_runs, shared)
  keys = sorted(set(x) & set(y))
  per_seed = {}
  for t, s in keys:
    per_seed.setdefault(t, []).append(x[(t, s)] - y[(t, s)])
  seeds = sorted(per_seed)
  d = np.asarray([np.mean(per_seed[t]) for t in seeds], np.float64)
  sd, half = t_interval(d)
  mean = float(d.mean()) if len(d) else None
  return {'metric': metric, 'n': len(seeds), 'unit': 'training seed', 'train_seeds': seeds,
          'per_seed': [float(v) for v in d], 'runs': len(keys), 'keys': [list(k) for k in keys],
          'sampling_seeds_per_train_seed': {str(t): len(per_seed[t]) for t in seeds},
          'mean': mean, 'sd': sd, 'half_width': half,
          'ci': None if half is None else [mean - half, mean + half], 'confidence': CONFIDENCE,
          'x_lower': int((d < 0).sum()), 'x_higher': int((d > 0).sum()),
          'unpaired': [len(set(x) - set(y)), len(set(y) - set(x))]}


def verdict(diff: dict, margin: float | None = None, lower_is_better: bool = True) -> dict:
  """Reads a paired difference x - y: {'verdict': 'decisive' (the interval excludes 0; 'direction' says
  whether x is better or worse), 'equivalent' (the whole interval lies inside +-margin) or 'not decisive'
  (it holds 0 and reaches past the margin, or there is no margin, or no interval), 'text'}."""
  if diff['ci'] is None:
    return {'verdict': 'not decisive', 'direction': None,
            'text': f'not decisive (fewer than 2 training seeds: n = {diff["n"]})'}
  lo, hi = diff['ci']
  ci = f'95% CI [{lo:+.4g}, {hi:+.4g}] over {diff["n"]} training seeds'
  inside = margin is not None and -margin <= lo and hi <= margin
  if lo > 0 or hi < 0:
    word = 'better' if (hi < 0) == lower_is_better else 'worse'
    small = f', inside +-{margin:.4g}' if inside else ''
    return {'verdict': 'decisive', 'direction': word,
            'text': f'decisive: {word} by {abs(diff["mean"]):.4g} ({ci}{small})'}
  if inside:
    return {'verdict': 'equivalent', 'direction': None,
            'text': f'equivalent within +-{margin:.4g} ({ci} lies inside)'}
  reach = f' and reaches past +-{margin:.4g}' if margin is not None else ''
  return {'verdict': 'not decisive', 'direction': None, 'text': f'not decisive ({ci} holds 0{reach})'}
