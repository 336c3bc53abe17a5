"""The study as data: the models it trains, the arms it samples (a model and a sampler), and the
comparisons it makes. Adding an arm adds a row here and its result files, never a branch in the runner.

Models, one per training seed (config.ablation.train_seeds), each from scratch for S steps
(config.train.steps) or trained on from another model of the same seed:

  var            causal mask (VAR), from scratch; also exported at S/2 (a kept checkpoint of the same run)
  sdd            markov mask (SDD), from scratch; also exported at S/2
  var_continued  var trained on with the causal mask for S more (finetune_steps)
  sdd_from_var   var trained on with the markov mask for S more: the paper's recipe
  refine         sdd trained on with the refine stream (zero-initialised, so it starts as sdd)
  student        a student on fewer scales (--mode=distill) of sdd, distill_steps
  student_kl     the same with distill_kl_weight x KL(teacher || student)

Arms (a letter for the issue's names, a suffix for the sampler):

  cfg 'var'    VAR's protocol: guidance 1.5 linear, top-k/top-p the config's, no masked resampling
  cfg 'grid'   the arm's own guidance strength, chosen per training seed on config.ablation.cfg_grid (one
               grid for every arm, at most 5 points) by validation samples (seed 1000) against
               training-split reals; jointly with a search when the arm has one
  cfg 'paper'  SRDD's protocol's strength (5.0) on the arm's schedule: the paper's guidance
  mr 'srdd'    SRDD's masked resampling, redraw 0.01 x 10, at the arm's guidance
  search       'redraw' / 'refine': masked resampling's threshold grid (mr_thresholds, mr_iterations);
               'truncation': the plain truncation grid of the same size (truncations), its partner

Groups: 'headline' (line 3 of issue 46), 'tools' (line 4: guidance schedule and masked resampling on (h)
and (i)), 'refine' and 'distill' (their code's coverage). config.ablation.arms names the groups or arms
run; every model an arm needs (its start, its teacher) is trained.
"""
from __future__ import annotations

import dataclasses

from srdd_jax.diffusion.filtering import PROTOCOLS


@dataclasses.dataclass(frozen=True)
class Model:
  name: str
  mask: str  # causal | markov (a student: its teacher's)
  refine: bool = False  # config.model.refine: the second stream of the scale's revealed tokens
  start: str = ''  # The model of the same training seed it is trained on from; '' = from scratch.
  teacher: str = ''  # A student: distilled from this model of the same training seed.
  kl: bool = False  # A student trained with the KL term to its teacher.
  half: bool = False  # Also exported at half its steps, from the same run (fd at S/2).

  @property
  def steps_key(self) -> str:
    """The config.ablation key of its steps (0 there = config.train.steps, or the fine-tunes')."""
    if self.teacher:
      return 'distill_steps'
    if self.refine:
      return 'refine_steps'
    return 'finetune_steps' if self.start else ''


MODELS = {m.name: m for m in (
    Model('var', 'causal', half=True),
    Model('sdd', 'markov', half=True),
    Model('var_continued', 'causal', start='var'),
    Model('sdd_from_var', 'markov', start='var'),
    Model('refine', 'markov', refine=True, start='sdd'),
    Model('student', 'markov', teacher='sdd'),
    Model('student_kl', 'markov', teacher='sdd', kl=True),
)}


@dataclasses.dataclass(frozen=True)
class Arm:
  key: str  # Its name in files and tables.
  model: str
  group: str
  description: str
  cfg: str = 'var'  # var | grid | paper (above)
  schedule: str = 'linear'
  mr: str = ''  # '' | srdd
  search: str = ''  # '' | redraw | refine | truncation
  half: bool = False  # The model's export at half its steps.

  @property
  def selects(self) -> bool:
    """Whether the arm chooses anything on validation samples."""
    return self.cfg == 'grid' or bool(self.search)


def _headline():
  out = []
  for letter, model, what in (('a', 'var', 'VAR from scratch'), ('b', 'sdd', 'SDD from scratch'),
                              ('h', 'var_continued', 'VAR continued from (a)'),
                              ('i', 'sdd_from_var', 'SDD fine-tuned from (a)')):
    out += [Arm(letter, model, 'headline', f'{what}, VAR\'s protocol'),
            Arm(f'{letter}_cfg', model, 'headline', f'{what}, its own guidance strength', cfg='grid')]
  out += [Arm(f'{letter}_half', model, 'headline', f'{what} at S/2 (same run), VAR\'s protocol', half=True)
          for letter, model, what in (('a', 'var', 'VAR'), ('b', 'sdd', 'SDD'))]
  return out


def _tools():
  out = []
  for letter, model in (('i', 'sdd_from_var'), ('h', 'var_continued')):
    out += [Arm(f'{letter}_constant', model, 'tools', f'({letter}), constant guidance schedule, own strength',
                cfg='grid', schedule='constant'),
            Arm(f'{letter}_paper', model, 'tools', f'({letter}), the paper\'s guidance ({PROTOCOLS["srdd"]["cfg"]:g} '
                f'{PROTOCOLS["srdd"]["cfg_schedule"]})', cfg='paper', schedule=PROTOCOLS['srdd']['cfg_schedule']),
            Arm(f'{letter}_redraw', model, 'tools', f'({letter}), own strength + SRDD\'s MR redraw '
                f'{PROTOCOLS["srdd"]["mr_threshold"]:g} x {PROTOCOLS["srdd"]["mr_iterations"]}', cfg='grid', mr='srdd'),
            Arm(f'{letter}_redraw_grid', model, 'tools', f'({letter}), MR redraw threshold grid x strength',
                cfg='grid', search='redraw'),
            Arm(f'{letter}_truncation_grid', model, 'tools', f'({letter}), truncation grid x strength (the MR '
                'grid\'s partner)', cfg='grid', search='truncation')]
  return out


ARMS = {a.key: a for a in (
    *_headline(), *_tools(),
    Arm('l', 'refine', 'refine', 'refine fine-tune of (b), MR refine threshold grid x strength', cfg='grid',
        search='refine'),
    Arm('l_truncation', 'refine', 'refine', 'refine fine-tune of (b), truncation grid x strength', cfg='grid',
        search='truncation'),
    Arm('f', 'student', 'distill', 'student of (b) on fewer scales, own strength', cfg='grid'),
    Arm('o', 'student_kl', 'distill', 'student of (b) with the KL term, own strength', cfg='grid'),
)}
GROUPS = ('headline', 'tools', 'refine', 'distill')
assert all(MODELS[a.model].half for a in ARMS.values() if a.half), 'an S/2 arm samples a model exported at S/2'


@dataclasses.dataclass(frozen=True)
class Comparison:
  """x - ref, paired by training seed; `margin` names the VAR arm whose mean fd x 5% is the margin of
  equivalence (the VAR arm at the same training length)."""
  question: str
  x: str
  ref: str
  margin: str


COMPARISONS = (
    Comparison('SDD vs VAR from scratch, VAR\'s protocol', 'b', 'a', 'a'),
    Comparison('SDD vs VAR from scratch, each its own guidance', 'b_cfg', 'a_cfg', 'a_cfg'),
    Comparison('SDD vs VAR from scratch at S/2, VAR\'s protocol', 'b_half', 'a_half', 'a_half'),
    Comparison('SDD fine-tuned from VAR vs VAR continued (the paper\'s recipe), VAR\'s protocol', 'i', 'h', 'h'),
    Comparison('SDD fine-tuned from VAR vs VAR continued, each its own guidance', 'i_cfg', 'h_cfg', 'h_cfg'),
    *(Comparison(f'own guidance strength vs VAR\'s protocol on ({k})', f'{k}_cfg', k, m)
      for k, m in (('a', 'a'), ('b', 'a'), ('h', 'h'), ('i', 'h'))),
    *(c for k in ('i', 'h') for c in (
        Comparison(f'constant vs linear guidance schedule on ({k})', f'{k}_constant', f'{k}_cfg', 'h_cfg'),
        Comparison(f'the paper\'s guidance vs the selected linear strength on ({k})', f'{k}_paper', f'{k}_cfg',
                   'h_cfg'),
        Comparison(f'SRDD\'s MR redraw vs none on ({k})', f'{k}_redraw', f'{k}_cfg', 'h_cfg'),
        Comparison(f'MR redraw threshold grid vs truncation grid on ({k})', f'{k}_redraw_grid',
                   f'{k}_truncation_grid', 'h_cfg'))),
    Comparison('MR refine threshold grid vs truncation grid on the refine fine-tune', 'l', 'l_truncation', 'h_cfg'),
    Comparison('student vs its teacher (b), each its own guidance', 'f', 'b_cfg', 'a_cfg'),
    Comparison('student with the KL term vs without', 'o', 'f', 'a_cfg'),
)
# Held-out token loss of two models at equal training steps, paired by training seed.
MODEL_COMPARISONS = (('markov vs causal from scratch', 'sdd', 'var'),
                     ('SDD fine-tuned from VAR vs VAR continued', 'sdd_from_var', 'var_continued'))


def select(names) -> list[Arm]:
  """The arms of `names` (groups or arm keys), in table order; ValueError naming an unknown one."""
  names = [n.strip() for n in names if n.strip()]
  unknown = [n for n in names if n not in GROUPS and n not in ARMS]
  if unknown:
    raise ValueError(f'{unknown[0]!r} is neither a group ({", ".join(GROUPS)}) nor an arm ({", ".join(ARMS)})')
  return [a for a in ARMS.values() if a.key in names or a.group in names]


def models_for(arms) -> list[Model]:
  """Every model the arms sample and every model those start from or distil, starts first."""
  need, order = set(), []

  def add(name):
    m = MODELS[name]
    for dep in (m.start, m.teacher):
      if dep:
        add(dep)
    if name not in need:
      need.add(name)
      order.append(m)
  for a in arms:
    add(a.model)
  return order
