"""srdd_jax/evaluation/paired.py: comparisons by training seed, on hand-made nested numbers where the
old per-run interval (a t over every (training seed, sampling seed) run, as if independent) decides
wrongly."""
import math

import numpy as np
import pytest
import scipy.stats

from srdd_jax.evaluation import paired

T2 = 4.302652729911275  # t(0.975, 2 df): 3 training seeds.


def _runs(values, **shared):
  """{(train_seed, sampling_seed): fd} -> runs with the fields every scored run has."""
  base = {'num_samples': 1000, 'real_split': 'test', 'real_examples': 10000, 'proxy_classifier': 'clf0'}
  return [{'train_seed': t, 'sampling_seed': s, 'fd': v, **base, **shared} for (t, s), v in values.items()]


def _nested(seed_effects, jitter=(-0.01, 0.0, 0.01)):
  """x - y = the training seed's effect plus a small sampling-seed jitter, 3 sampling seeds each."""
  x = {(t, s): 10.0 + e + j for t, e in enumerate(seed_effects) for s, j in enumerate(jitter)}
  y = {k: 10.0 for k in x}
  return _runs(x), _runs(y)


def _per_run_interval(x, y):
  """The old rule: every run an independent pair (what the 2026-12-03 study reported)."""
  d = np.asarray([a['fd'] - b['fd'] for a, b in zip(x, y)])
  half = scipy.stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
  return d.mean() - half, d.mean() + half


def test_nested_runs_average_per_training_seed_before_the_interval():
  x, y = _nested([1.0, 0.1, 0.7])
  d = paired.paired_difference(x, y, 'fd')
  # Per training seed: 1.0, 0.1, 0.7 (the jitter averages out); mean 0.6, sd 0.4583, t with 2 df.
  assert d['per_seed'] == pytest.approx([1.0, 0.1, 0.7]) and d['train_seeds'] == [0, 1, 2]
  assert (d['n'], d['runs'], d['unit']) == (3, 9, 'training seed')
  sd = math.sqrt(((0.4) ** 2 + 0.5 ** 2 + 0.1 ** 2) / 2)
  assert d['mean'] == pytest.approx(0.6) and d['sd'] == pytest.approx(sd)
  assert d['half_width'] == pytest.approx(T2 * sd / math.sqrt(3))  # 1.138
  assert d['ci'][0] < 0 < d['ci'][1]
  # The per-run interval over 9 pseudo-independent pairs excludes 0 and would call this decisive.
  lo, hi = _per_run_interval(x, y)
  assert lo > 0 and hi - lo < d['ci'][1] - d['ci'][0]
  assert paired.verdict(d, margin=0.5)['verdict'] == 'not decisive'
  assert paired.verdict(d, margin=0.5)['text'] == (
      'not decisive (95% CI [-0.5384, +1.738] over 3 training seeds holds 0 and reaches past +-0.5)')


def test_equivalence_needs_the_whole_interval_inside_the_margin():
  # Seeds' effects -0.2, 0.25, 0.05: per run the interval is narrow ([-0.11, +0.18]: the old rule's
  # half-width 0.15 <= a margin of 0.5 said "equivalent"); per training seed it is [-0.51, +0.58].
  x, y = _nested([-0.2, 0.25, 0.05])
  lo, hi = _per_run_interval(x, y)
  assert -0.5 < lo < 0 < hi < 0.5
  d = paired.paired_difference(x, y, 'fd')
  assert d['ci'][0] < -0.5 and d['ci'][1] > 0.5
  assert paired.verdict(d, margin=0.5)['verdict'] == 'not decisive'
  # Half-width at most the margin is not enough: [-0.1, 0.9] with margin 0.5 reaches 0.9.
  wide = {**d, 'mean': 0.4, 'half_width': 0.5, 'ci': [-0.1, 0.9]}
  assert paired.verdict(wide, margin=0.5)['verdict'] == 'not decisive'
  # Inside +-margin: equivalent; excluding 0: decisive (and said to be inside when it is).
  assert paired.verdict({**d, 'ci': [-0.3, 0.4]}, margin=0.5) == {
      'verdict': 'equivalent', 'direction': None,
      'text': 'equivalent within +-0.5 (95% CI [-0.3, +0.4] over 3 training seeds lies inside)'}
  assert paired.verdict({**d, 'mean': 0.2, 'ci': [0.1, 0.3]}, margin=0.5)['text'] == (
      'decisive: worse by 0.2 (95% CI [+0.1, +0.3] over 3 training seeds, inside +-0.5)')
  better = paired.verdict({**d, 'mean': -1.0, 'ci': [-1.5, -0.5]}, margin=0.5)
  assert (better['verdict'], better['direction']) == ('decisive', 'better')
  higher_is_better = paired.verdict({**d, 'mean': -1.0, 'ci': [-1.5, -0.5]}, lower_is_better=False)
  assert higher_is_better['direction'] == 'worse'
  assert paired.verdict({**d, 'ci': [-0.3, 0.4]})['verdict'] == 'not decisive'  # No margin: no equivalence.


def test_a_decisive_difference_stays_decisive_per_training_seed():
  x, y = _nested([1.5, 1.4, 1.6])
  d = paired.paired_difference(x, y, 'fd')
  assert d['ci'][0] > 0 and (d['x_lower'], d['x_higher']) == (0, 3)
  assert paired.verdict(d, margin=0.5)['direction'] == 'worse'


def test_unbalanced_and_unpaired_runs():
  # Training seed 0 has 2 shared sampling seeds, seed 1 one; y has a run without a partner.
  x = _runs({(0, 0): 11.0, (0, 1): 13.0, (1, 0): 10.5})
  y = _runs({(0, 0): 10.0, (0, 1): 10.0, (1, 0): 10.0, (2, 0): 10.0})
  d = paired.paired_difference(x, y, 'fd')
  assert d['per_seed'] == [2.0, 0.5] and d['unpaired'] == [0, 1] and d['runs'] == 3
  assert d['sampling_seeds_per_train_seed'] == {'0': 2, '1': 1}
  assert d['half_width'] == pytest.approx(scipy.stats.t.ppf(0.975, 1) * (1.5 / math.sqrt(2)) / math.sqrt(2))
  one = paired.paired_difference(x[:2], y, 'fd')
  assert one['n'] == 1 and one['ci'] is None
  assert paired.verdict(one, 0.5)['text'] == 'not decisive (fewer than 2 training seeds: n = 1)'


@pytest.mark.parametrize('field, value', [('num_samples', 500), ('real_split', 'train'), ('real_examples', 5000),
                                          ('proxy_classifier', 'clf1')])
def test_runs_that_differ_in_what_a_pair_shares_are_refused(field, value):
  x, y = _nested([1.0, 1.0, 1.0])
  y[4] = {**y[4], field: value}
  with pytest.raises(ValueError, match=f"runs differ in '{field}'"):
    paired.paired_difference(x, y, 'fd')
  del y[4][field]
  with pytest.raises(ValueError, match=f"has no '{field}'"):
    paired.paired_difference(x, y, 'fd')


def test_duplicate_keys_and_missing_metrics_are_errors():
  x, y = _nested([1.0, 1.0])
  with pytest.raises(ValueError, match='two runs of x share the key'):
    paired.paired_difference(x + x[:1], y, 'fd')
  with pytest.raises(ValueError, match="a run of y has no 'precision'"):
    paired.paired_difference([{**r, 'precision': 0.5} for r in x], y, 'precision')
