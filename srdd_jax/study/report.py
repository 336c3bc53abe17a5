"""study.json, study.md and study.png, a pure function of the units' result files: the models'
(models/<model>_seed<s>/result.json), the (arm, training seed) summaries
(arms/<arm>/seed<s>/summary/result.json) and the timings (cost/<arm>/result.json). A copy of those files
elsewhere (a run of record's) rebuilds the same report with `write(that_directory, ...)`."""
from __future__ import annotations

import itertools

from srdd_jax import files
from srdd_jax.evaluation.plot import Chart
from srdd_jax.parallel import multihost
from srdd_jax.study import arms as study_arms
from srdd_jax.study import comparisons as study_comparisons

OUTPUTS = ('json', 'md', 'png')


def _results(root: str, *parts) -> dict:
  """{name: result.json's content} of root/<name>/<parts...>/result.json, for every name under root."""
  out = {}
  for name in sorted(files.listdir(root)) if files.isdir(root) else []:
    path = files.join(root, name, *parts, 'result.json')
    if files.isfile(path):
      out[name] = files.read_json(path)
  return out


def read(directory: str, arms=None, train_seeds=None) -> dict:
  """The result files under `directory`: models, (arm, seed) summaries (only `arms` and `train_seeds`
  when given: a workdir may hold an earlier command's), timings."""
  keep_seed = lambda s: train_seeds is None or int(s) in train_seeds
  models = [m for m in _results(files.join(directory, 'models')).values() if keep_seed(m['seed'])]
  summaries = {}
  for arm in study_arms.ARMS:
    if arms is not None and arm not in arms:
      continue
    seeds = _results(files.join(directory, 'arms', arm), 'summary')
    kept = [s for s in seeds.values() if keep_seed(s['train_seed'])]
    if kept:
      summaries[arm] = kept
  return {'models': models, 'summaries': summaries, 'cost': _results(files.join(directory, 'cost'))}


def build(directory: str, extra: dict | None = None, arms=None, train_seeds=None) -> dict:
  """study.json's content: every arm over its training seeds, every comparison, the models, and `extra`
  (the run's command, commit, plan, rates, unit times)."""
  r = read(directory, arms, train_seeds)
  tables = {k: study_comparisons.arm_table(v) for k, v in r['summaries'].items()}
  for k, t in tables.items():
    cost = r['cost'].get(k)
    t['cost'] = cost and {x: cost[x] for x in ('images_per_s', 'seconds_per_image', 'compiled_memory_bytes',
                                               'forward_passes_per_image', 'batch', 'device')}
  return {**(extra or {}), 'arms': tables, 'comparisons': study_comparisons.comparisons(tables),
          'model_comparisons': study_comparisons.model_comparisons(r['models']),
          'models': sorted(r['models'], key=lambda m: (m['model'], m['seed']))}


def write(directory: str, extra: dict | None = None, arms=None, train_seeds=None, out_dir: str | None = None) -> dict:
  """Builds the report of `directory` and writes out_dir (default directory)/study.{json,md,png}."""
  out = build(directory, extra, arms, train_seeds)
  out_dir = out_dir or directory
  out['outputs'] = {k: files.join(out_dir, f'study.{k}') for k in OUTPUTS}
  if multihost.is_main_process():
    files.write_json(out['outputs']['json'], out)
    files.write_text(out['outputs']['md'], markdown(out))
    plot(out['arms'], out['outputs']['png'])
  return out


def _sampler(s: dict) -> str:
  text = f'{s["cfg_schedule"]} {s["cfg"]:g}'
  if s.get('mr_iterations'):
    text += f', MR {s["mr_mode"]} {s["mr_threshold"]:g} x {s["mr_iterations"]}'
  for k in ('top_p', 'min_p'):
    if s.get(k) and s[k] != 0:
      text += f', {k} {s[k]:g}'
  return text


def samplers_text(samplers: list[dict]) -> str:
  """The arm's sampler, or each training seed's when their choices differ."""
  texts = [_sampler(s) for s in samplers]
  return texts[0] if len(set(texts)) == 1 else ' / '.join(texts) + ' (per seed)'


def markdown(out: dict) -> str:
  tables = out['arms']
  if not tables:
    return '# The study\n\nNo (arm, training seed) has finished yet.\n'
  first = next(iter(tables.values()))
  p = out.get('protocol', {})
  quick = ' (quick: smoke-test sizes, not a result)' if out.get('quick') else ''
  lines = [f'# The study: VAR against SDD and SRDD\'s sampling tools{quick}', '']
  if out.get('command'):
    lines += [f'Command: `{out["command"]}`  ', f'Commit: `{out.get("commit", "unknown")}`  ']
  if out.get('unit_seconds'):
    lines.append(f'Wall time of its units: {out["unit_seconds"]["total"]:.0f} s (' + ', '.join(
        f'{k} {v:.0f} s' for k, v in out['unit_seconds'].items() if k != 'total') + ')')
  if p:
    lines += ['', f'Training: S = {p["training_steps"]} steps per model from scratch, training seeds '
              f'{p["train_seeds"]}; test: sampling seeds {p["sample_seeds"]} x {p["test_per_class"]} per class '
              f'against test-split reals. Choices: {p["selection_rule"]}. `{first["fd_name"]}` is the proxy '
              'classifier\'s Fréchet distance (not an FID): lower is better.']
  lines += ['', f'| arm | what | model | training steps | sampler | {first["fd_name"]} | class consistency | '
            'precision | recall | held-out token loss | train step s | images/s | compiled sampling MiB | '
            'passes/image |', '|' + '---|' * 14]
  for k, t in tables.items():
    ms = lambda m: f'{t[m]["mean"]:.3f} ± {t[m]["sd"]:.3f}'
    cost = t.get('cost') or {}
    mem = cost.get('compiled_memory_bytes')
    loss = 'n/a' if t['heldout_loss'] is None else f'{t["heldout_loss"]["mean"]:.4f} ± {t["heldout_loss"]["sd"]:.4f}'
    step = 'n/a' if t['train_step_seconds'] is None else f'{t["train_step_seconds"]:.4f}'
    lines.append(
        f'| ({k}) | {t["description"]} | {t["model"]} | {", ".join(map(str, t["training_steps"]))} | '
        f'{samplers_text(t["samplers"])} | {ms("fd")} (n={t["fd"]["n"]}) | {ms("class_consistency")} | '
        f'{ms("precision")} | {ms("recall")} | {loss} | {step} | '
        f'{cost.get("images_per_s", float("nan")):.1f} | {"n/a" if mem is None else f"{mem / 2 ** 20:.1f}"} | '
        f'{cost.get("forward_passes_per_image", "n/a")} |')
  lines += ['', 'Mean ± standard deviation over training seeds of each seed\'s mean over its sampling seeds (n: '
            'training seeds). Precision and recall: improved k-NN (k = 3) manifolds in the proxy classifier\'s '
            'feature space. Held-out token loss: teacher forcing on the test cache at the end of training.', '',
            '## Findings (paired by training seed; fd lower is better)', '',
            'Each comparison averages each training seed\'s runs first, then gives a 95% t interval over the '
            'training seeds (n - 1 degrees of freedom). Decisive: the interval excludes 0. Equivalent: the whole '
            f'interval lies inside ±{study_comparisons.MARGIN:.0%} of the mean fd of VAR\'s arm at the same training '
            'length. Otherwise not decisive: it neither shows a difference nor rules one out.', '']
  lines += study_comparisons.lines(out['comparisons'], out['model_comparisons'])
  return '\n'.join(lines) + '\n'


COLOURS = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22',
           '#17becf', '#393b79', '#ad494a', '#637939', '#8c6d31', '#7b4173']


def plot(tables: dict, path: str, size=(1040, 560), pr_width: int = 480):
  """Left: fd (lower is better) against sampling seconds per image, a point per timed arm with ±sd bars
  over training seeds, its key beside it and named in the legend. Right: precision against recall (the
  trade truncation and masked resampling make, which fd alone hides)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  timed = {k: t for k, t in tables.items() if t.get('cost')}
  xs = [t['cost']['seconds_per_image'] for t in timed.values()] or [1.0]
  lo = [t['fd']['mean'] - t['fd']['sd'] for t in tables.values()] or [0.0]
  hi = [t['fd']['mean'] + t['fd']['sd'] for t in tables.values()] or [1.0]
  right = 360  # The legend's margin.
  chart = Chart(size, (0.0, max(xs) * 1.1 or 1.0), (min(0.0, min(lo)), max(hi) * 1.1 or 1.0), right=right,
                x_title='sampling seconds per image', x_title_at=(size[0] - right) // 2 - 40,
                y_title='fd (proxy), lower is better; bars: ± sd over training seeds', x_tick='{:.2g}',
                y_tick='{:.3g}')
  d, w, top = chart.draw, size[0], chart.top
  for i, ((k, t), col) in enumerate(zip(tables.items(), itertools.cycle(COLOURS))):
    m, s = t['fd']['mean'], t['fd']['sd']
    if k in timed:
      x = chart.px(t['cost']['seconds_per_image'])
      d.line([(x, chart.py(m - s)), (x, chart.py(m + s))], fill=col, width=2)
      d.ellipse([x - 4, chart.py(m) - 4, x + 4, chart.py(m) + 4], fill=col)
      d.text((x + 6, chart.py(m) - 6 + 11 * (i % 3 - 1)), k, fill=col)
    d.text((w - right + 20, top + 15 * i), f'({k}) {t["model"]}: {m:.2f} ± {s:.2f}', fill=col)
  pr = Chart((pr_width, size[1]), (0.0, 1.0), (0.0, 1.0), x_title='recall', x_title_at=pr_width // 2 - 20,
             y_title='precision (k-NN manifolds, proxy features)', x_tick='{:.2g}', y_tick='{:.2g}')
  for (k, t), col in zip(tables.items(), itertools.cycle(COLOURS)):
    x, y = pr.px(t['recall']['mean']), pr.py(t['precision']['mean'])
    pr.draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=col)
    pr.draw.text((x + 6, y - 6), k, fill=col)
  both = Image.new('RGB', (size[0] + pr_width, size[1]), 'white')
  both.paste(chart.image, (0, 0))
  both.paste(pr.image, (size[0], 0))
  files.save_image(path, both)
