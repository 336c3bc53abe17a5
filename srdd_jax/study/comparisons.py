"""The study's numbers from its (arm, training seed) summaries: each arm over its training seeds, and every
comparison of arms.COMPARISONS whose arms ran, paired by training seed (evaluation/paired.py): each
training seed's runs averaged first, a 95% t interval over training seeds; on fd a verdict with the
margin of equivalence 5% of the mean fd of the comparison's VAR arm."""
from __future__ import annotations

import numpy as np

from srdd_jax.evaluation import paired
from srdd_jax.study import arms as study_arms

MARGIN = 0.05  # Equivalent only when the whole interval lies inside +-5% of VAR's fd.
# (name, lower is better)
METRICS = (('fd', True), ('class_consistency', False), ('precision', False), ('recall', False))


def over_seeds(values) -> dict:
  """{'mean', 'sd' (over training seeds, 0 for one), 'n', 'values'} of per-training-seed values."""
  v = [float(x) for x in values]
  return {'mean': float(np.mean(v)), 'sd': float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, 'n': len(v), 'values': v}


def arm_table(summaries: list[dict]) -> dict:
  """One arm's summaries (one per training seed) -> its numbers: each metric as the mean over training
  seeds of each seed's mean over its sampling seeds, the choices per seed, the runs."""
  summaries = sorted(summaries, key=lambda s: s['train_seed'])
  first = summaries[0]
  out = {k: first[k] for k in ('arm', 'group', 'description', 'model')}
  out.update(train_seeds=[s['train_seed'] for s in summaries],
             training_steps=sorted({s['training_steps'] for s in summaries}),
             fd_name=first['runs'][0]['fd_name'], samplers=[s['sampler'] for s in summaries],
             runs=[r for s in summaries for r in s['runs']],
             runs_per_seed=sorted({len(s['runs']) for s in summaries}),
             num_samples=sorted({r['num_samples'] for s in summaries for r in s['runs']}))
  for metric, _ in METRICS:
    out[metric] = over_seeds([np.mean([r[metric] for r in s['runs']]) for s in summaries])
  losses = [s['heldout_loss'] for s in summaries if s.get('heldout_loss') is not None]
  out['heldout_loss'] = over_seeds(losses) if losses else None
  rates = [s['train_steps_per_s'] for s in summaries if s.get('train_steps_per_s')]
  out['train_step_seconds'] = 1.0 / float(np.mean(rates)) if rates else None
  return out


def compare(tables: dict, question: str, x: str, ref: str, margin_arm: str | None) -> dict:
  """x - ref on every metric, paired by training seed; on fd the verdict with 5% of margin_arm's mean fd."""
  base = tables[margin_arm]['fd']['mean'] if margin_arm in tables else None
  c = {'question': question, 'x': x, 'ref': ref, 'margin_arm': margin_arm,
       'margin': MARGIN * base if base is not None else None,
       'margin_rule': f'{MARGIN:.0%} of ({margin_arm})\'s mean fd'}
  for metric, lower in METRICS:
    d = paired.paired_difference(tables[x]['runs'], tables[ref]['runs'], metric)
    d['verdict'] = paired.verdict(d, c['margin'] if metric == 'fd' else None, lower_is_better=lower)
    del d['keys']  # Every run is in the arms' tables.
    c[metric] = d
  return c


def comparisons(tables: dict) -> list[dict]:
  """Every comparison of arms.COMPARISONS whose two arms are in `tables`."""
  return [compare(tables, c.question, c.x, c.ref, c.margin) for c in study_arms.COMPARISONS
          if c.x in tables and c.ref in tables]


def model_comparisons(models: list[dict]) -> list[dict]:
  """Held-out token loss (teacher forcing on the test cache, the end of training) of the model pairs of
  arms.MODEL_COMPARISONS, paired by training seed."""
  out = []
  for question, x, ref in study_arms.MODEL_COMPARISONS:
    runs = {name: [{'train_seed': m['seed'], 'sampling_seed': 0, 'heldout_loss': m['heldout_loss']}
                   for m in models if m['model'] == name and m.get('heldout_loss') is not None]
            for name in (x, ref)}
    if runs[x] and runs[ref]:
      d = paired.paired_difference(runs[x], runs[ref], 'heldout_loss', shared=())
      d['verdict'] = paired.verdict(d)
      del d['keys']
      out.append({'question': question, 'x': x, 'ref': ref, 'heldout_loss': d})
  return out


def lines(comps: list[dict], model_comps: list[dict]) -> list[str]:
  """One sentence per comparison: the fd difference with its interval and verdict, then the others'."""
  out = []
  for c in comps:
    d = c['fd']
    if d['mean'] is None:
      out.append(f'- {c["question"]}: ({c["x"]}) vs ({c["ref"]}): no shared training seeds, nothing to compare.')
      continue
    others = '; '.join(
        f'{m} {c[m]["mean"]:+.4g}' + (f' [{c[m]["ci"][0]:+.3g}, {c[m]["ci"][1]:+.3g}]' if c[m]['ci'] else '')
        for m, _ in METRICS[1:] if c[m]['mean'] is not None)
    same = ' (the same samples: both arms sampled with the same settings)' if not any(d['per_seed']) else ''
    out.append(f'- {c["question"]}: ({c["x"]}) - ({c["ref"]}) fd {d["mean"]:+.4g}{same} ({d["runs"]} paired runs in '
               f'{d["n"]} training seeds; ({c["x"]}) lower in {d["x_lower"]} of {d["n"]}): **{d["verdict"]["text"]}**'
               + (f'. {others}.' if others else '.'))
  for c in model_comps:
    d = c['heldout_loss']
    out.append(f'- held-out token loss, {c["question"]}: {c["x"]} - {c["ref"]} {d["mean"]:+.4g} over {d["n"]} '
               f'training seeds: **{d["verdict"]["text"]}** (no margin: equivalence is not claimed).')
  return out
