"""config.ablation read and checked (one ConfigError naming the key, before anything is written), the
sampler settings each arm samples or chooses from, the work of a run counted before it starts, and the
progress of a run against that count with an ETA."""
from __future__ import annotations

from absl import logging

from srdd_jax.config import ConfigError, floats, ints, with_defaults
from srdd_jax.diffusion.filtering import PROTOCOLS
from srdd_jax.study import arms as study_arms

VALIDATION_SEED = 1000  # Sampling seed of every choice; no test sampling seed is it.
MAX_CFG_POINTS = 5  # One small guidance grid for every arm.


def parse_truncations(text: str, key: str) -> tuple[dict, ...]:
  """'top_p=0.9,min_p=0.05' -> ({'top_p': 0.9, 'min_p': 0.0}, {'top_p': 0.0, 'min_p': 0.05}): each entry
  one truncation alone (top-k stays the config's)."""
  out = []
  for part in str(text).split(','):
    part = part.strip()
    if not part:
      continue
    name, _, value = part.partition('=')
    try:
      v = float(value)
    except ValueError:
      v = None
    if name.strip() not in ('top_p', 'min_p') or v is None or not 0 <= v < 1 or (name.strip() == 'top_p' and v == 0):
      raise ConfigError(f'{key}: {part!r}; write top_p=P or min_p=P with P in (0, 1)')
    out.append({'top_p': v if name.strip() == 'top_p' else 0.0, 'min_p': v if name.strip() == 'min_p' else 0.0})
  return tuple(out)


def options(config) -> dict:
  """config.ablation's values, checked; config a resolved config (with_defaults)."""
  a = config.ablation
  o = dict(train_seeds=ints(a.train_seeds, 'config.ablation.train_seeds'),
           sample_seeds=ints(a.sample_seeds, 'config.ablation.sample_seeds'),
           cfg_grid=floats(a.cfg_grid, 'config.ablation.cfg_grid'),
           schedules=tuple(s.strip() for s in str(a.schedules).split(',') if s.strip()),
           val_per_class=int(a.val_per_class), test_per_class=int(a.test_per_class),
           timing_repeats=int(a.timing_repeats),
           mr_thresholds=floats(a.mr_thresholds, 'config.ablation.mr_thresholds'),
           mr_iterations=ints(a.mr_iterations, 'config.ablation.mr_iterations'),
           truncations=parse_truncations(a.truncations, 'config.ablation.truncations'))
  for key in ('train_seeds', 'sample_seeds', 'cfg_grid', 'schedules', 'mr_thresholds', 'mr_iterations',
              'truncations'):
    if not o[key]:
      raise ConfigError(f'config.ablation.{key} is empty')
  try:
    chosen = study_arms.select(str(a.arms).split(','))
  except ValueError as e:
    raise ConfigError(f'config.ablation.arms={a.arms!r}: {e}') from None
  bad = [s for s in o['schedules'] if s not in ('linear', 'constant')]
  if bad or 'linear' not in o['schedules']:
    raise ConfigError(f'config.ablation.schedules={a.schedules!r}: linear (the protocols\' schedule), and '
                      'constant if its arms are to run')
  o['arms'] = [arm for arm in chosen if arm.schedule in o['schedules']]
  if not o['arms']:
    raise ConfigError(f'config.ablation.arms={a.arms!r}: no arm left')
  grid = o['cfg_grid']
  if len(grid) > MAX_CFG_POINTS or any(c < 0 for c in grid) or len(set(grid)) != len(grid):
    raise ConfigError(f'config.ablation.cfg_grid={a.cfg_grid!r}: at most {MAX_CFG_POINTS} distinct strengths >= 0')
  if any(not 0 < t < 1 for t in o['mr_thresholds']) or len(o['mr_iterations']) != 1 or o['mr_iterations'][0] < 1:
    raise ConfigError(f'config.ablation.mr_thresholds={a.mr_thresholds!r} / mr_iterations={a.mr_iterations!r}: '
                      'thresholds in (0, 1), one iteration count >= 1')
  if len(o['truncations']) != len(o['mr_thresholds']):
    raise ConfigError(f'config.ablation.truncations has {len(o["truncations"])} settings and mr_thresholds '
                      f'{len(o["mr_thresholds"])}: the masked resampling grid and its truncation partner must '
                      'have the same number of validation runs')
  if len(set(o['train_seeds'])) != len(o['train_seeds']) or len(set(o['sample_seeds'])) != len(o['sample_seeds']):
    raise ConfigError('config.ablation.train_seeds / sample_seeds: repeated seeds')
  if VALIDATION_SEED in o['sample_seeds']:
    raise ConfigError(f'config.ablation.sample_seeds: {VALIDATION_SEED} is the validation seed; test seeds differ')
  for key in ('val_per_class', 'test_per_class', 'timing_repeats'):
    if o[key] < 1:
      raise ConfigError(f'config.ablation.{key}={o[key]} must be >= 1')
  if float(a.distill_kl_weight) <= 0:
    raise ConfigError(f'config.ablation.distill_kl_weight={a.distill_kl_weight}: must be > 0 (the student_kl '
                      'model is the student with the KL term)')
  if int(a.heldout_points) < 1:
    raise ConfigError(f'config.ablation.heldout_points={a.heldout_points} must be >= 1')
  for key in ('refine_steps', 'distill_steps', 'finetune_steps', 'heldout_examples'):
    if int(a[key]) < 0:
      raise ConfigError(f'config.ablation.{key}={a[key]} must be >= 0 (0 = ' +
                        ('all' if key == 'heldout_examples' else 'the default steps') + ')')
  if int(config.train.steps) < 2:
    raise ConfigError(f'config.train.steps={config.train.steps}: the study needs a step count S >= 2 (the same '
                      'for every model; S/2 is exported too)')
  if config.data.source == 'synthetic':
    raise ConfigError('config.data is missing (its source is the default, synthetic): the proxy metrics '
                      'compare with real images of a data set')
  o['models'] = study_arms.models_for(o['arms'])
  o['steps'] = {m.name: steps(config, m) for m in o['models']}
  return o


def steps(config, model) -> int:
  """Training steps of `model` in this config: S for a model from scratch; a fine-tune's finetune_steps,
  the refine fine-tune's refine_steps, a student's distill_steps, 0 meaning S (refine: the fine-tunes')."""
  a, s = config.ablation, int(config.train.steps)
  if model.steps_key == 'refine_steps':
    return int(a.refine_steps) or int(a.finetune_steps) or s
  return (int(a[model.steps_key]) if model.steps_key else 0) or s


# --- sampler settings ---

def sampler_values(schedule: str, cfg: float, setting: dict | None = None) -> dict:
  """config.sampler's values: guidance `schedule` and strength `cfg`, and one point of a search space:
  masked resampling {'mr_mode', 'mr_threshold', 'mr_iterations'} or truncation {'top_p', 'min_p'}; None:
  MR off and the config's own truncation."""
  out = dict(cfg=float(cfg), cfg_schedule=schedule, mr_threshold=0.0, mr_iterations=0, mr_mode='redraw',
             min_p=0.0)
  out.update(setting or {})
  return out


def search_space(arm, o: dict) -> list[dict | None]:
  """The settings an arm samples beside guidance: its grid, SRDD's MR, or [None]."""
  if arm.search in ('redraw', 'refine'):
    return [{'mr_mode': arm.search, 'mr_threshold': t, 'mr_iterations': o['mr_iterations'][0]}
            for t in o['mr_thresholds']]
  if arm.search == 'truncation':
    return [dict(t) for t in o['truncations']]
  if arm.mr == 'srdd':
    return [{'mr_mode': 'redraw', 'mr_threshold': PROTOCOLS['srdd']['mr_threshold'],
             'mr_iterations': PROTOCOLS['srdd']['mr_iterations']}]
  return [None]


def strengths(arm, o: dict) -> list[float]:
  if arm.cfg == 'grid':
    return list(o['cfg_grid'])
  return [float(PROTOCOLS['srdd' if arm.cfg == 'paper' else 'var']['cfg'])]


def candidates(arm, o: dict) -> list[dict]:
  """Every sampler setting the arm may sample with: one when it chooses nothing; else its validation grid
  (strengths x search space), in the order ties go to (the smaller strength, then the earlier setting)."""
  return [sampler_values(arm.schedule, c, s) for c in sorted(strengths(arm, o)) for s in search_space(arm, o)]


def choose(scores: list[tuple[dict, float]]) -> dict:
  """The values of the lowest validation fd; ties (within 1e-9 relative) go to the earlier candidate."""
  if not scores:
    raise ValueError('choose: no scores')
  best = min(fd for _, fd in scores)
  tol = 1e-9 * max(1.0, abs(best))
  return next(values for values, fd in scores if fd - best <= tol)


def setting_name(values: dict) -> str:
  """A file name of sampler values: schedule, strength and the search point."""
  name = f'{values["cfg_schedule"]}_cfg{values["cfg"]:g}'
  if values.get('mr_iterations'):
    name += f'_{values["mr_mode"]}_t{values["mr_threshold"]:g}_x{values["mr_iterations"]}'
  for k in ('top_p', 'min_p'):
    if values.get(k):
      name += f'_{k}{values[k]:g}'
  return name


def passes(values: dict | None) -> int:
  """Transformer passes per image and scale of a sampler setting: 1, or 1 + iterations for MR refine."""
  refine = bool(values) and values.get('mr_mode') == 'refine' and int(values.get('mr_iterations') or 0) > 0
  return 1 + int(values['mr_iterations']) if refine else 1


# --- the plan ---

def plan(config) -> dict:
  """What a run of `config` does, counted before it starts (logged, and kept in study.json): models and
  training steps, validation and test runs with their images and image-passes (an image through the
  transformer once per scale; MR refine costs 1 + iterations), in all and per group of arms."""
  config = with_defaults(config)
  o = options(config)
  n, classes = len(o['train_seeds']), int(config.model.num_classes)
  out = {'arms': len(o['arms']), 'models': len(o['models']) * n,
         'training_steps': sum(o['steps'].values()) * n, 'examples_per_step': int(config.train.global_batch),
         'validation_runs': 0, 'validation_images': 0, 'validation_image_passes': 0,
         'test_runs': 0, 'test_images': 0, 'test_image_passes_at_most': 0, 'groups': {}}
  for arm in o['arms']:
    cands = candidates(arm, o)
    val = len(cands) * n if arm.selects else 0
    test = n * len(o['sample_seeds'])
    g = out['groups'].setdefault(arm.group, {'arms': 0, 'validation_image_passes': 0, 'test_image_passes_at_most': 0})
    g['arms'] += 1
    work = {'validation_runs': val, 'validation_images': val * o['val_per_class'] * classes,
            'validation_image_passes': sum(passes(v) for v in cands) * n * o['val_per_class'] * classes if val else 0,
            'test_runs': test, 'test_images': test * o['test_per_class'] * classes,
            'test_image_passes_at_most': test * max(passes(v) for v in cands) * o['test_per_class'] * classes}
    for k, v in work.items():
      out[k] += v
    g['validation_image_passes'] += work['validation_image_passes']
    g['test_image_passes_at_most'] += work['test_image_passes_at_most']
  return out


def log_plan(p: dict, cache: str | None) -> None:
  logging.info('study: %d arms, %d models, %s training steps of %d examples; %d validation runs (%s images, %s '
               'image-passes), %d test runs (%s images, at most %s image-passes); per group (image-passes, '
               'validation + test): %s; compilation cache %s', p['arms'], p['models'], f'{p["training_steps"]:,}',
               p['examples_per_step'], p['validation_runs'], f'{p["validation_images"]:,}',
               f'{p["validation_image_passes"]:,}', p['test_runs'], f'{p["test_images"]:,}',
               f'{p["test_image_passes_at_most"]:,}',
               ', '.join(f'{k} {g["validation_image_passes"] + g["test_image_passes_at_most"]:,}'
                         for k, g in p['groups'].items()), cache)


class Progress:
  """A study of hours says how far it is: work done against the plan (training steps; sampled images
  weighted by their passes) and the time it took, logged after each unit with an ETA; the rates are kept
  in study.json (`rates`), the numbers a preset is sized from. Units kept from an earlier command count
  with the seconds they took then; token caches and timings are not in the ETA."""

  def __init__(self, p: dict):
    self.total = {'training': p['training_steps'],
                  'sampling': p['validation_image_passes'] + p['test_image_passes_at_most']}
    self.done = {'training': 0, 'sampling': 0}
    self.seconds = {'training': 0.0, 'sampling': 0.0, 'other': 0.0}

  @staticmethod
  def work(name: str, value: dict) -> tuple[str, int]:
    if name.startswith('models/') and 'steps' in value:
      return 'training', int(value['steps'])
    if name.startswith('arms/') and 'num_samples' in value:
      return 'sampling', int(value['num_samples']) * passes(value.get('sampler'))
    return 'other', 0

  def __call__(self, name: str, value: dict, seconds: float, ran: bool) -> None:
    kind, amount = self.work(name, value)
    if kind != 'other':
      self.done[kind] += amount
    self.seconds[kind] += float(seconds or 0.0)
    if ran:
      logging.info('study: %s', self.line())

  def rates(self) -> dict:
    per = lambda kind: self.seconds[kind] / self.done[kind] if self.done[kind] else None
    return {'seconds_per_training_step': per('training'), 'seconds_per_image_pass': per('sampling'),
            'done': dict(self.done), 'total': dict(self.total),
            'seconds': {k: round(v, 1) for k, v in self.seconds.items()}}

  def eta(self) -> float | None:
    """Seconds left at the rates so far (sampling at most: refine runs counted at their most iterations);
    None until every kind of work left has a rate."""
    r = self.rates()
    left = 0.0
    for kind, rate in (('training', r['seconds_per_training_step']), ('sampling', r['seconds_per_image_pass'])):
      remaining = max(self.total[kind] - self.done[kind], 0)
      if remaining and rate is None:
        return None
      left += remaining * (rate or 0.0)
    return left

  def line(self) -> str:
    r, eta = self.rates(), self.eta()
    train = f'training {self.done["training"]:,}/{self.total["training"]:,} steps'
    if r['seconds_per_training_step']:
      train += f' ({r["seconds_per_training_step"]:.3f} s each)'
    samp = f'sampling {self.done["sampling"]:,}/{self.total["sampling"]:,} image-passes'
    if r['seconds_per_image_pass']:
      samp += f' ({r["seconds_per_image_pass"] * 1e3:.2f} ms each)'
    when = (f'ETA at most {duration(eta)}' if eta is not None else
            'ETA once training and sampling have each run a unit')
    return f'{train}; {samp}; {when}'


def duration(seconds: float) -> str:
  m = int(round(seconds / 60))
  return f'{m // 60} h {m % 60:02d} min' if m >= 60 else f'{m} min'
