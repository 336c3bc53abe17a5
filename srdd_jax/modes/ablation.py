"""`--mode=ablation`: VAR against scale-wise discrete diffusion (SDD) and SRDD's tools, one resumable command.

 python -m srdd_jax.main --config=configs/ablation.py --workdir=DIR --mode=ablation
 python -m srdd_jax.main --config=configs/ablation.py:quick --workdir=DIR --mode=ablation   # smoke test

Every variant shares the tokenizer, the token caches, the data, the steps, the optimizer and the seeds:

 (a) var                causal mask, VAR's protocol (cfg 1.5 linear, no masked resampling)
 (b) sdd                markov mask, the same protocol
 (c) sdd_guided         markov, the best guidance schedule and strength (selection rule below)
 (d) sdd_guided_redraw  (c) + masked resampling `redraw` (SRDD's 0.01 x 10)
 (e) sdd_guided_refine  the refine model (config.model.refine, trained from scratch with the same steps),
            its own selection + masked resampling `refine` (0.01 x 10)
 (f) sdd_distilled      a student (--mode=distill, the same steps) of the best markov model, its own selection
 (g) var_guided_redraw  the causal model, its own selection + `redraw`
 (n) var_guided_truncated  the causal model, its own selection over plain truncation (redraw's partner)
 (o) sdd_distilled_kl   (f) trained with + distill_kl_weight x KL(teacher || student)

The paper's recipe, every model started from a from-scratch model of the same training seed and trained
config.ablation.finetune_steps more (fresh optimizer and schedule; the table's training steps are the total):

 (h) var_continued            (a)'s model trained on with the causal mask, VAR's protocol
 (i) sdd_from_var             (a)'s model trained on with the markov mask (SRDD's recipe), VAR's protocol
 (j) sdd_finetuned            (b)'s model trained on plainly, its own selection, MR off
 (k) sdd_finetuned_redraw     (j) + `redraw`
 (l) refine_finetuned         (b)'s model trained on with the refine stream (zero-initialised, so it starts
                              as (b)), its own selection, MR off
 (m) refine_finetuned_refine  (l) + `refine`

(i) against (h) is the Markov mask at equal total steps; (l)/(m) against (j)/(k) is the refine stream
against the same steps of plain fine-tuning. Every model's held-out token loss over training
(config.ablation.heldout_points evaluations, on heldout_examples test-cache examples) is in ablation.json,
with whether it reached the plateau rule (< 1% better over the last fifth).

Selection rule, the same for (c), (e), (f), (g), (j), (l): for each schedule of config.ablation.schedules and each
strength of config.ablation.cfg_grid, val_per_class samples per class with the validation seed (1000, no test
seed) from the first training seed's model, without masked resampling, scored by the proxy Fréchet distance
against *training-split* real images; the lowest wins, ties go to the smaller strength, then to the earlier
schedule. The choice is applied to every training seed's model. The test split is never used to choose.
The teacher of (f) is the markov seed whose model scores lowest on the same validation with (c)'s choice.

Sampling for the selection and the test evaluation runs one compiled program per architecture and masked
resampling setting, the guidance strengths an argument of it (Sampler.tokens(guidance=)), so the grid costs
one compile. The timed `cost` unit times and sizes the program that drew the variant's scored samples:
that traced program when the variant is guided (a constant strength would run the same two halves), and
for an unguided variant (strength 0) its own program without the null-class half, which costs half.

Each unit of work (tokenizer, token caches, each model, each validation point, each test evaluation, each
held-out loss, each timing) writes WORKDIR/<unit>/result.json and is skipped when that file exists, so an
interrupted run resumes without redoing finished units (training units also resume from checkpoints).
Outputs: WORKDIR/ablation.json (every number and the protocol), ablation.md (the table, and one computed
sentence per comparison of HEADLINES and per student against its own teacher: the paired difference over
shared (training seed, sampling seed) runs with its 95% interval, "not decisive" when the interval's
half-width exceeds 5% of (a)'s fd) and ablation.png (fd against sampling seconds per image; precision
against recall).

Fairness: every model gets config.train.steps (refine_steps / distill_steps 0 = the same); the refine model
and the student are extra training on the markov side, shown in the table's "training steps" column. The
selection's search has the same number of validation runs for every selecting variant; (a), (b), (h) and
(i) select nothing (VAR's protocol).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from srdd_jax import files
from srdd_jax.config import ConfigError, floats, ints, with_defaults
from srdd_jax.convert.loading import load_models, tokenizer_for_model
from srdd_jax.data.token_cache import TokenCache
from srdd_jax.diffusion.filtering import PROTOCOLS
from srdd_jax.diffusion.generate import generate, sampler_from_config
from srdd_jax.diffusion.sampler import batch_rng
from srdd_jax.evaluation import paired, protocol, proxy
from srdd_jax.evaluation.plot import Chart
from srdd_jax.modes import distill, tokenize, train, train_tokenizer
from srdd_jax.parallel import compile_cache as jax_cache
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import multihost
from srdd_jax.parallel.compile import compiled_stats, jit_inference, needed_bytes
from srdd_jax.parallel.workdir import Units
from srdd_jax.train.distill import heldout_token_loss, student_patch_nums

LOADED_MODELS = 3  # Models the scorer keeps in memory (the seeds of one variant, in turn).
VALIDATION_SEED = 1000  # Sampling seed of the selection: no test sampling seed (config.ablation.sample_seeds) is it.

# variant -> (model kind, search, MR mode). search None: VAR's fixed protocol (cfg 1.5 linear, nothing
# selected); 'truncation': guidance x plain truncation (config.ablation.truncations: top-p, min-p);
# 'mr': guidance x masked resampling in the variant's mode (config.ablation.mr_thresholds x mr_iterations).
# The two searches have the same number of validation runs (checked), so no variant is tuned more.
VARIANTS = {
    'a': ('causal', None, None),
    'b': ('markov', None, None),
    'c': ('markov', 'truncation', None),
    'd': ('markov', 'mr', 'redraw'),
    'e': ('refine', 'mr', 'refine'),
    'f': ('distilled', 'truncation', None),
    'g': ('causal', 'mr', 'redraw'),
    # The paper's recipe: a trained VAR model continued with each mask for the same steps ...
    'h': ('causal_continued', None, None),
    'i': ('markov_from_var', None, None),
    # ... and a trained SDD model fine-tuned plainly or with the refine stream, each with MR off and on.
    'j': ('markov_continued', 'truncation', None),
    'k': ('markov_continued', 'mr', 'redraw'),
    'l': ('refine_finetuned', 'truncation', None),
    'm': ('refine_finetuned', 'mr', 'refine'),
    # VAR with the same-size search over plain truncation: redraw's partner on the causal model.
    'n': ('causal', 'truncation', None),
    # (f) with the KL term to the teacher (config.ablation.distill_kl_weight): distillation proper.
    'o': ('distilled_kl', 'truncation', None),
}
DISTILLED = ('distilled', 'distilled_kl')
# Fine-tuned kinds: kind -> (mask, refine stream, the from-scratch kind whose model of the same seed
# starts it). Each trains config.ablation.finetune_steps more; its total is its start's steps + those.
FINETUNED = {
    'causal_continued': ('causal', False, 'causal'),
    'markov_from_var': ('markov', False, 'causal'),
    'markov_continued': ('markov', False, 'markov'),
    'refine_finetuned': ('markov', True, 'markov'),
}
NAMES = {'a': 'var', 'b': 'sdd', 'c': 'sdd_guided', 'd': 'sdd_guided_redraw', 'e': 'sdd_guided_refine',
         'f': 'sdd_distilled', 'g': 'var_guided_redraw', 'h': 'var_continued', 'i': 'sdd_from_var',
         'j': 'sdd_finetuned', 'k': 'sdd_finetuned_redraw', 'l': 'refine_finetuned', 'm': 'refine_finetuned_refine',
         'n': 'var_guided_truncated', 'o': 'sdd_distilled_kl'}
DESCRIPTIONS = {
    'a': 'VAR: causal mask, VAR protocol', 'b': 'SDD: markov mask, VAR protocol',
    'c': 'SDD + best guidance and truncation', 'd': 'SDD + best guidance and MR redraw',
    'e': 'refine model, best guidance and MR refine',
    'f': 'distilled student of the best markov model, best guidance and truncation',
    'g': 'VAR + best guidance and MR redraw',
    'h': 'VAR continued: (a) trained on, causal mask, VAR protocol',
    'i': 'SDD fine-tuned from VAR: (a) trained on with the markov mask, VAR protocol',
    'j': 'SDD fine-tuned plainly: (b) trained on, best guidance and truncation, MR off',
    'k': '(j)\'s model, best guidance and MR redraw',
    'l': 'refine fine-tune of (b) (zero-initialised stream), best guidance and truncation, MR off',
    'm': '(l)\'s model, best guidance and MR refine', 'n': 'VAR + best guidance and truncation',
    'o': '(f) trained with + distill_kl_weight x KL(teacher || student), best guidance and truncation'}


# --- pure pieces (unit-tested) --------------------------------------------------------------------

def select_guidance(scores, schedules) -> tuple:
  """The key of the lowest validation score; ties go to the smaller cfg, then the earlier schedule, then
  the earlier setting of the search space.

  scores: {(schedule, cfg) or (schedule, cfg, setting index): validation Fréchet distance}. Only
  validation scores come in: the rule cannot see the test split."""
  if not scores:
    raise ValueError('select_guidance: no scores')
  order = {s: i for i, s in enumerate(schedules)}
  best = min(scores.values())
  tol = 1e-9 * max(1.0, abs(best))
  tied = [k for k, v in scores.items() if v - best <= tol]
  return min(tied, key=lambda k: (k[1], order.get(k[0], len(order)), *k[2:]))


def heldout_curve(metrics_path: str) -> list[list[float]]:
  """[[step, held-out token loss], ...] of a training run's metrics.jsonl (the last record of a step wins:
  a resumed run logs its checkpoint's step again)."""
  if not files.isfile(metrics_path):
    return []
  by_step = {}
  with files.open(metrics_path) as f:
    for r in map(json.loads, f):
      if 'heldout_loss' in r:
        by_step[int(r['step'])] = float(r['heldout_loss'])
  return [[s, by_step[s]] for s in sorted(by_step)]


PLATEAU_FRACTION, PLATEAU_GAIN = 0.2, 0.01  # Plateau: < 1% better over the last fifth of training.


def plateau(curves) -> dict:
  """Whether every model's held-out loss improved by less than PLATEAU_GAIN (relative) over the last
  PLATEAU_FRACTION of its steps: the loss at the last point at or before that fifth began against the
  last point (a coarser curve measures over more than the fifth, never less; no such point: unknown)."""
  gains = []
  for curve in curves:
    last_step = curve[-1][0] if curve else 0
    before = [loss for step, loss in (curve or [])[:-1] if step <= last_step * (1 - PLATEAU_FRACTION)]
    if not before:
      gains.append(None)
      continue
    begin = before[-1]
    gains.append((begin - curve[-1][1]) / begin if begin else 0.0)
  known = [g for g in gains if g is not None]
  return {'rule': f'held-out token loss improves by < {PLATEAU_GAIN:.0%} over the last '
                  f'{PLATEAU_FRACTION:.0%} of training', 'relative_gain_last_fifth': gains,
          'reached': bool(known) and len(known) == len(gains) and all(g < PLATEAU_GAIN for g in known)}


def mean_std(values) -> dict:
  """{'mean', 'std' (sample std, 0 for one value), 'n', 'values'}."""
  v = [float(x) for x in values]
  return {'mean': float(np.mean(v)), 'std': float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, 'n': len(v),
          'values': v}


# The comparisons the ablation is for: (question, variant, its reference).
HEADLINES = (('SDD vs VAR (same protocol)', 'b', 'a'), ('best guidance and truncation on SDD', 'c', 'b'),
             ('MR redraw vs tuned truncation on SDD', 'd', 'c'), ('trained MR refine', 'e', 'c'),
             ('scale distillation', 'f', 'c'), ('MR redraw vs tuned truncation on VAR', 'g', 'n'),
             ('SDD with its tools vs VAR with them', 'd', 'g'), ('tuned SDD vs tuned VAR, truncation', 'c', 'n'),
             ("SDD fine-tuned from VAR vs VAR continued (the paper's recipe)", 'i', 'h'),
             ('MR redraw on a fine-tuned SDD', 'k', 'j'), ('refine fine-tune vs plain fine-tune, MR off', 'l', 'j'),
             ('MR refine on the refine fine-tune', 'm', 'l'),
             ('refine fine-tune + MR refine vs plain fine-tune + MR redraw', 'm', 'k'))


RESOLUTION = 0.05  # Equivalent only when the whole 95% CI lies inside +-5% of VAR's (a) mean fd.
METRICS = (('fd', True), ('class_consistency', False), ('precision', False), ('recall', False))  # (name, lower is better)


def comparisons(variants: dict, teachers: dict | None = None, resolution: float = RESOLUTION) -> list[dict]:
  """Every comparison of HEADLINES (and each student against its own teacher, sampled with the student's
  settings: `teachers` {variant: teacher runs}) as paired differences over shared (training seed,
  sampling seed) keys, averaged per training seed, for each of METRICS; the verdict on fd with the margin
  `resolution` x (a)'s mean fd."""
  base = variants['a']['fd']['mean'] if 'a' in variants else None
  pairs = [(q, x, ref, variants[x]['runs'], variants[ref]['runs']) for q, x, ref in HEADLINES
           if x in variants and ref in variants]
  for v, runs in (teachers or {}).items():
    if v in variants:
      pairs.append((f'student ({v}) vs its own teacher, same sampler', v, f'{v} teacher', variants[v]['runs'], runs))
  out = []
  for question, x, ref, xr, yr in pairs:
    c = {'question': question, 'x': x, 'ref': ref,
         'resolution': resolution * base if base is not None else None,
         'resolution_rule': f'{resolution:.0%} of (a)\'s mean fd'}
    for metric, lower in METRICS:
      d = paired.paired_difference(xr, yr, metric)
      if metric == 'fd' and c['resolution'] is not None:
        d['verdict'] = paired.verdict(d, c['resolution'], lower_is_better=lower)
      c[metric] = d
    out.append(c)
  return out


def comparison_lines(comps: list[dict]) -> list[str]:
  """One sentence per comparison: the fd difference with its interval and verdict, then the others'."""
  lines = []
  for c in comps:
    d = c['fd']
    if d['mean'] is None:
      lines.append(f'- {c["question"]}: ({c["x"]}) vs ({c["ref"]}): no shared seeds, nothing to compare.')
      continue
    ci = 'no interval' if d['ci'] is None else f'95% CI [{d["ci"][0]:.4g}, {d["ci"][1]:.4g}], half-width {d["half_width"]:.4g}'
    text = d.get('verdict', {}).get('text', 'no resolution')
    others = '; '.join(f'{m} {c[m]["mean"]:+.4g}' + (f' ± {c[m]["half_width"]:.3g}' if c[m]['half_width'] is not None else '')
                       for m, _ in METRICS[1:] if c[m]['mean'] is not None)
    lines.append(f'- {c["question"]}: ({c["x"]}) - ({c["ref"]}) fd {d["mean"]:+.4g} over {d["n"]} training seeds '
                 f'({ci}; ({c["x"]}) lower in {d["x_lower"]} of {d["n"]}): **{text}**' + (f'. {others}.' if others else '.'))
  return lines


# --- sampling and scoring -------------------------------------------------------------------------

def sampler_values(schedule: str, cfg: float, setting: dict | None = None) -> dict:
  """config.sampler's values: guidance `schedule` and strength `cfg`, and one point of a search space
  (search_space): masked resampling {'mr_mode', 'mr_threshold', 'mr_iterations'} or truncation
  {'top_p', 'min_p'}; None: MR off and the config's own truncation."""
  out = dict(cfg=float(cfg), cfg_schedule=schedule, mr_threshold=0.0, mr_iterations=0, mr_mode='redraw',
             min_p=0.0)
  out.update(setting or {})
  return out


def search_space(o: dict, search: str | None, mr: str | None) -> list[dict]:
  """The settings a variant's selection tries beside guidance: MR's thresholds x iterations in mode `mr`,
  or the plain truncations; [None] for VAR's fixed protocol."""
  if search == 'mr':
    return [{'mr_mode': mr, 'mr_threshold': t, 'mr_iterations': n}
            for t in o['mr_thresholds'] for n in o['mr_iterations']]
  if search == 'truncation':
    return [dict(t) for t in o['truncations']]
  return [None]


def setting_name(setting: dict | None) -> str:
  if not setting:
    return 'default'
  if 'mr_mode' in setting:
    return f'{setting["mr_mode"]}_t{setting["mr_threshold"]:g}_x{setting["mr_iterations"]}'
  return '_'.join(f'{k}{v:g}' for k, v in sorted(setting.items()) if v)  or 'untruncated'


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


class Scorer:
  """Samples trained transformers (dicts with their 'export') with given sampler values and scores the
  samples with the proxy metrics (evaluation/protocol) against real images of the training or the test
  split, one classifier for every model (seed 0, whatever the training seed: the fd numbers compare).

  `config` is the base config (its data, sampler, eval and mesh); `tokenizer` the tokenizer checkpoint
  of every model. One compiled sampling program per architecture and masked resampling setting, the
  guidance strengths an argument of it (`program(traced=True)`)."""

  def __init__(self, config, workdir: str, tokenizer: str):
    self.base, self.workdir, self.tok = config, workdir, tokenizer
    self.compiled = {}  # (architecture, SamplerConfig, traced) -> (sampler, compiled, stats, batch)
    self.loaded = collections.OrderedDict()  # Model export -> load_models(...): the last few, read once.
    c = with_defaults(config)
    self.proxy = protocol.ProxyScorer(c, c.eval.to_dict(), workdir, seed=0, precision_recall=True)

  def models(self, c, export: str):
    """load_models of `c` (whose model.checkpoint is `export`, mask and refine left to the checkpoint),
    kept for the last LOADED_MODELS exports: a model is sampled for every selection point, test seed and
    timing, and reading its checkpoint each time was a third of a quick run's wall time."""
    if export not in self.loaded:
      self.loaded[export] = load_models(c)
      while len(self.loaded) > LOADED_MODELS:
        self.loaded.popitem(last=False)
    self.loaded.move_to_end(export)
    return self.loaded[export]

  def program(self, model: dict, values: dict, traced: bool = False):
    """(sampler, var params, vae params, compiled, stats, batch, guidance) for `model` sampled with `values`.

    traced=False: guidance is a constant of the program (what `cost` times unguided). traced=True: the
    guidance strengths are an argument (`guidance`, returned), so one program per architecture and MR
    setting serves every schedule and strength of the grid; strength 0 then still runs the null-class
    half and gives the unguided tokens exactly."""
    c = with_defaults(self.base)
    c.tokenizer.checkpoint, c.model.checkpoint, c.model.mask, c.model.refine = self.tok, model['export'], '', False
    c.sampler.update(values)
    sampler, var_params, vae_params = sampler_from_config(c, self.models(c, model['export']))
    guidance = sampler.guidance_array() if traced else None
    program = dataclasses.replace(sampler.config, cfg=0.0, cfg_schedule='constant') if traced else sampler.config
    # Keyed on the architecture, not the weights: the seeds' models share one compiled program.
    key = (repr(sampler.var_config), repr(sampler.vae_config), repr(sampler.decoder.config), program, traced)
    if key not in self.compiled:
      bs = int(c.eval.batch_size)
      n_par = pm.data_parallel_size(sampler.mesh)
      if bs < 1 or bs % n_par:
        raise ConfigError(f'config.eval.batch_size={bs} must be a positive multiple of the data-parallel '
                          f'size {n_par}')
      labels = self.labels(sampler, np.zeros((bs,), np.int32))
      t0 = time.time()
      if traced:
        fn = lambda vp, ap, lab, rng, g, s=sampler: s.sample(vp, ap, lab, rng, guidance=g)
        compiled = jit_inference(fn).lower(var_params, vae_params, labels, batch_rng(0, 0), guidance).compile()
      else:
        compiled = jit_inference(sampler.sample).lower(var_params, vae_params, labels, batch_rng(0, 0)).compile()
      stats = compiled_stats(compiled)
      logging.info('ablation: sampler compiled in %.1fs (%s, %s, MR %s)', time.time() - t0,
                   files.basename(model['export']),
                   'guidance as an argument' if traced else f'cfg {values["cfg"]:g} {values["cfg_schedule"]}',
                   values['mr_mode'] if values['mr_iterations'] else 'off')
      self.compiled[key] = (sampler, compiled, stats, bs)
    sampler, compiled, stats, bs = self.compiled[key]
    return sampler, var_params, vae_params, compiled, stats, bs, guidance

  @staticmethod
  def labels(sampler, labels):
    """Labels placed as the compiled programs take them: split over the mesh's batch axes."""
    return jax.device_put(np.asarray(labels, np.int32), NamedSharding(sampler.mesh, PartitionSpec(('data', 'fsdp'))))

  def score(self, model: dict, values: dict, per_class: int, seed: int, which: str) -> dict:
    """The proxy metrics of per_class samples of every class, drawn with sampling seed `seed`
    (diffusion/generate), against the real images of split `which`."""
    sampler, var_params, vae_params, compiled, _, bs, guidance = self.program(model, values, traced=True)
    labels = np.repeat(np.arange(sampler.var_config.num_classes, dtype=np.int32), per_class)
    images = generate(sampler, var_params, vae_params, labels, bs, seed, key='config.eval.batch_size',
                      program=lambda vp, ap, lab, rng: compiled(vp, ap, lab, rng, guidance))
    m = self.proxy(images, labels, which)
    name = proxy.fd_name(self.proxy.clf)
    return {'fd_name': name, 'fd': m[name], 'class_consistency': m['class_consistency'],
            'precision': m['precision'], 'recall': m['recall'],
            'classifier_test_accuracy': m['classifier_test_accuracy'], 'proxy_classifier': m['proxy_classifier'],
            'real_split': which, 'real_examples': m['proxy_real_examples'], 'num_samples': int(len(labels)),
            'sampling_seed': seed, 'sampler': values, 'model': model['export']}


class _Stopped(Exception):
  def __init__(self, summary):
    super().__init__('stopped')
    self.summary = summary


def _options(config) -> dict:
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
  if any(not 0 < t < 1 for t in o['mr_thresholds']) or any(n < 1 for n in o['mr_iterations']):
    raise ConfigError(f'config.ablation.mr_thresholds={a.mr_thresholds!r} / mr_iterations={a.mr_iterations!r}: '
                      'thresholds in (0, 1), iterations >= 1')
  n_mr = len(o['mr_thresholds']) * len(o['mr_iterations'])
  if len(o['truncations']) != n_mr:
    raise ConfigError(f'config.ablation.truncations has {len(o["truncations"])} settings and masked '
                      f'resampling {n_mr} (mr_thresholds x mr_iterations): every variant\'s search must have '
                      'the same number of validation runs')
  if len(set(o['train_seeds'])) != len(o['train_seeds']) or len(set(o['sample_seeds'])) != len(o['sample_seeds']):
    raise ConfigError('config.ablation.train_seeds / sample_seeds: repeated seeds')
  if VALIDATION_SEED in o['sample_seeds']:
    raise ConfigError(f'config.ablation.sample_seeds: {VALIDATION_SEED} is the validation seed; test seeds differ')
  bad = [s for s in o['schedules'] if s not in ('linear', 'constant')]
  if bad:
    raise ConfigError(f'config.ablation.schedules: {bad[0]!r}; use linear and/or constant')
  if any(c < 0 for c in o['cfg_grid']):
    raise ConfigError(f'config.ablation.cfg_grid={a.cfg_grid!r}: strengths must be >= 0')
  for key in ('val_per_class', 'test_per_class', 'timing_repeats'):
    if o[key] < 1:
      raise ConfigError(f'config.ablation.{key}={o[key]} must be >= 1')
  if float(a.distill_kl_weight) <= 0:
    raise ConfigError(f'config.ablation.distill_kl_weight={a.distill_kl_weight}: must be > 0 (variant (o) is '
                      '(f) with the KL term; (f) itself trains without it)')
  if int(a.heldout_points) < 1:
    raise ConfigError(f'config.ablation.heldout_points={a.heldout_points} must be >= 1')
  for key in ('refine_steps', 'distill_steps', 'finetune_steps', 'heldout_examples'):
    if int(a[key]) < 0:
      raise ConfigError(f'config.ablation.{key}={a[key]} must be >= 0 (0 = ' +
                        ('all' if key == 'heldout_examples' else 'config.train.steps') + ')')
  if int(config.train.steps) < 1:
    raise ConfigError(f'config.train.steps={config.train.steps}: the ablation needs a step count (>= 1), the '
                      'same for every model')
  if config.data.source == 'synthetic':
    raise ConfigError('config.data is missing (its source is the default, synthetic): the proxy metrics '
                      'compare with real images of a data set')
  return o


def plan(config) -> dict:
  """What a run of `config` does, counted before it starts (logged, and kept in ablation.json): the models
  and their training steps, the validation and test sampling runs and their images. How a preset is
  sized: each count times a rate measured on the machine (docs/RESULTS.md)."""
  config = with_defaults(config)
  o, a = _options(config), config.ablation
  n = len(o['train_seeds'])
  steps = int(config.train.steps)
  refine = int(a.refine_steps) or steps
  finetune = int(a.finetune_steps) or steps
  distill_steps = int(a.distill_steps) or steps
  classes = int(config.model.num_classes)
  guidance = sum(1 for c in o['cfg_grid'] if c == 0) + sum(1 for c in o['cfg_grid'] if c != 0) * len(o['schedules'])
  selecting = [v for v, (_, search, _) in VARIANTS.items() if search]
  validation_runs = len(selecting) * guidance * len(o['truncations']) + n  # + the teacher's choice.
  students = sum(kind in DISTILLED for kind, _, _ in VARIANTS.values())  # One model each, and its teacher.
  test_runs = ((len(VARIANTS) - students) * n + 2 * students) * len(o['sample_seeds'])
  # What sampling costs beyond its image count: MR refine runs the transformer 1 + iterations times on
  # each scale (Sampler.forward_passes), so a search over 5, 10 and 25 iterations costs 14x a plain one.
  # Passes per image, summed over runs; the test's refine runs at the most iterations they may select.
  validation_passes = n + sum(guidance * sum(_passes(s) for s in search_space(o, search, mr))
                              for _, search, mr in VARIANTS.values() if search)
  most = max(_passes(s) for _, search, mr in VARIANTS.values() for s in search_space(o, search, mr))
  test_passes = sum((2 if kind in DISTILLED else n) * len(o['sample_seeds']) * (most if mr == 'refine' else 1)
                    for kind, _, mr in VARIANTS.values())
  return {'models': 3 * n + len(FINETUNED) * n + len(DISTILLED),
          'training_steps': (2 * steps + refine) * n + len(FINETUNED) * finetune * n + len(DISTILLED) * distill_steps,
          'examples_per_step': int(config.train.global_batch),
          'validation_runs': validation_runs, 'validation_images': validation_runs * o['val_per_class'] * classes,
          'validation_image_passes': validation_passes * o['val_per_class'] * classes,
          'test_runs': test_runs, 'test_images': test_runs * o['test_per_class'] * classes,
          'test_image_passes_at_most': test_passes * o['test_per_class'] * classes}


def _passes(setting: dict | None) -> int:
  """Transformer passes per image and scale of a sampler setting: 1, or 1 + iterations for MR refine."""
  refine = bool(setting) and setting.get('mr_mode') == 'refine' and int(setting.get('mr_iterations') or 0) > 0
  return 1 + int(setting['mr_iterations']) if refine else 1


class Progress:
  """A study of hours says how far it is: work done against the plan (training steps; sampled images
  weighted by their passes, _passes) and the time it took, logged after each unit with an ETA, and the
  rates kept in ablation.json (`rates`), the numbers a preset is sized from. Units kept from an earlier
  command count with the seconds they took then. Held-out losses, token caches and timings are not in
  the ETA (minutes of a run of hours)."""

  def __init__(self, p: dict):
    self.total = {'training': p['training_steps'],
                  'sampling': p['validation_image_passes'] + p['test_image_passes_at_most']}
    self.done = {'training': 0, 'sampling': 0}
    self.seconds = {'training': 0.0, 'sampling': 0.0, 'other': 0.0}

  @staticmethod
  def work(name: str, value: dict) -> tuple[str, int]:
    if name.startswith('models/') and 'steps' in value:
      return 'training', int(value['steps'])
    if name.startswith(('selection/', 'evaluation/')) and 'num_samples' in value:
      return 'sampling', int(value['num_samples']) * _passes(value.get('sampler'))
    return 'other', 0

  def __call__(self, name: str, value: dict, seconds: float, ran: bool) -> None:
    kind, amount = self.work(name, value)
    if kind != 'other':
      self.done[kind] += amount
    self.seconds[kind] += float(seconds or 0.0)
    if ran:
      logging.info('ablation: %s', self.line())

  def rates(self) -> dict:
    return {'seconds_per_training_step': self.seconds['training'] / self.done['training'] if self.done['training'] else None,
            'seconds_per_image_pass': self.seconds['sampling'] / self.done['sampling'] if self.done['sampling'] else None,
            'done': dict(self.done), 'total': dict(self.total), 'seconds': {k: round(v, 1) for k, v in self.seconds.items()}}

  def eta(self) -> float | None:
    """Seconds left at the rates so far (sampling at most: the test's refine runs counted at the most
    iterations); None until both kinds of work have a rate."""
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
    when = (f'ETA at most {_duration(eta)}' if eta is not None else
            'ETA once training and sampling have each run a unit')
    return f'{train}; {samp}; {when}'


def _duration(seconds: float) -> str:
  m = int(round(seconds / 60))
  return f'{m // 60} h {m % 60:02d} min' if m >= 60 else f'{m} min'


def compile_cache(workdir: str) -> str | None:
  """JAX's persistent compilation cache (srdd_jax.main sets it up for every mode; WORKDIR/jax_cache unless
  one is set): a run resumed after a time limit or a preemption reloads the sampling and held-out programs
  it compiled before instead of compiling them again. (Each model's train step still compiles: its seed's
  key is a constant of the program.)"""
  return jax_cache.ensure(workdir)


def _git_commit() -> str:
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=10,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or 'unknown'
  except (OSError, subprocess.SubprocessError):
    return 'unknown'


def _steps_per_s(metrics_path: str) -> float | None:
  """Median training rate of the logged windows, the first one left out when there are others (it holds
  the step's compilation)."""
  if not files.isfile(metrics_path):
    return None
  with files.open(metrics_path) as f:
    rates = [r['steps_per_s'] for r in map(json.loads, f) if 'steps_per_s' in r]
  if len(rates) > 1:
    rates = rates[1:]
  return float(statistics.median(rates)) if rates else None


# --- the run --------------------------------------------------------------------------------------

class _Ablation:

  def __init__(self, config, workdir: str):
    self.base, self.workdir = config, workdir
    self.o = _options(config)
    self.units = Units(workdir, label='ablation: unit')
    self.steps = int(config.train.steps)

  def cfg(self):
    return with_defaults(self.base)

  # --- shared stages ---
  def tokenizer(self) -> str:
    def fn():
      if self.base.tokenizer.checkpoint:
        return {'export': self.base.tokenizer.checkpoint, 'trained_here': False}
      s = train_tokenizer.run(self.cfg(), self.workdir)
      if not s.get('export'):
        raise _Stopped({**s, 'stage': 'tokenizer'})
      return {'export': s['export'], 'trained_here': True, 'steps': s['end_step'],
              'eval_psnr_end': s.get('eval_psnr_end')}
    return self.units('tokenizer', fn)['export']

  def tokens(self, split: str, patch_nums, name: str) -> str:
    out_dir = files.join(self.workdir, 'tokens', name)

    def fn():
      c = self.cfg()
      c.tokenizer.checkpoint = self.tok
      c.model.patch_nums = tuple(patch_nums)
      c.tokenize.out_dir, c.tokenize.split = out_dir, split
      s = tokenize.run(c, self.workdir)
      return {'out_dir': out_dir, 'split': split, 'patch_nums': list(patch_nums),
              'count': s.get('count')}
    return self.units(f'tokens/{name}', fn)['out_dir']

  # --- models ---
  def model(self, kind: str, seed: int, start: dict | None = None) -> dict:
    """The model of `kind` and training seed `seed`: from scratch, or (FINETUNED kinds) trained on from
    `start`, the from-scratch model of the same seed, with a fresh optimizer and learning-rate schedule."""
    name = f'models/{kind}_seed{seed}'
    root = files.join(self.workdir, name)

    def fn():
      c = self.cfg()
      c.seed = seed
      c.tokenizer.checkpoint = self.tok
      c.data.token_cache = self.cache_train
      if start is not None:
        c.model.mask, c.model.refine, _ = FINETUNED[kind]
        c.train.init_from = start['export']
        steps = int(c.ablation.finetune_steps) or self.steps
      else:
        c.model.mask = 'causal' if kind == 'causal' else 'markov'
        c.model.refine = kind == 'refine'
        steps = int(c.ablation.refine_steps) if kind == 'refine' and int(c.ablation.refine_steps) > 0 else self.steps
      c.train.steps = steps
      # The held-out token loss over training (ablation.json's curves, the plateau rule).
      c.train.heldout_cache = self.cache_test
      c.train.heldout_every = max(1, steps // max(1, int(c.ablation.heldout_points)))
      c.train.heldout_examples = int(c.ablation.heldout_examples)
      s = train.run(c, root)
      if not s.get('export'):
        raise _Stopped({**s, 'stage': name})
      metrics = files.join(root, 'metrics.jsonl')
      return {'export': s['export'], 'kind': kind, 'seed': seed, 'steps': steps,
              'start': start and {'export': start['export'], 'kind': start['kind'], 'steps': start['steps']},
              'start_steps': start['steps'] if start else 0,
              'steps_per_s': _steps_per_s(metrics), 'heldout_curve': heldout_curve(metrics),
              'last_loss': s.get('last_loss'), 'patch_nums': list(self.pn)}
    return self.units(name, fn)

  def distilled(self, teacher: dict, kind: str = 'distilled') -> dict:
    """The student of `teacher`: 'distilled' on the re-quantised tokens alone (kl_weight 0), 'distilled_kl'
    with config.ablation.distill_kl_weight x KL(teacher || student) added."""
    name = f'models/{kind}'
    root = files.join(self.workdir, name)

    def fn():
      c = self.cfg()
      c.seed = teacher['seed']
      c.tokenizer.checkpoint = self.tok
      c.distill.teacher = teacher['export']
      c.distill.token_cache = self.cache_student_train
      c.distill.kl_weight = float(c.ablation.distill_kl_weight) if kind == 'distilled_kl' else 0.0
      steps = int(c.ablation.distill_steps) or self.steps
      c.train.steps = steps
      s = distill.run(c, root)
      if not s.get('export'):
        raise _Stopped({**s, 'stage': name})
      return {'export': s['export'], 'kind': kind, 'seed': teacher['seed'], 'steps': steps,
              'kl_weight': float(c.distill.kl_weight),
              'teacher': teacher['export'], 'teacher_steps': teacher['steps'],
              'steps_per_s': _steps_per_s(files.join(root, 'metrics.jsonl')),
              'last_loss': s.get('last_loss'), 'patch_nums': list(self.student_pn)}
    return self.units(name, fn)

  def heldout(self, name: str, model: dict) -> dict:
    def fn():
      c = self.cfg()
      c.tokenizer.checkpoint, c.model.checkpoint, c.model.mask, c.model.refine = self.tok, model['export'], '', False
      sampler, var_params, vae_params = sampler_from_config(c, self.scorer.models(c, model['export']))
      student = tuple(model['patch_nums']) != tuple(self.pn)
      cache = TokenCache(self.cache_student_test if student else self.cache_test,
                         patch_nums=sampler.var_config.patch_nums)
      r = heldout_token_loss(sampler.var_config, var_params, sampler.vae_config, vae_params,
                             cache.ids[:, 0], cache.labels, batch_size=int(c.eval.batch_size))
      return r
    return self.units(f'heldout/{name.replace("models/", "")}', fn)

  # --- selection ---
  def select(self, variant: str, model: dict) -> dict:
    """Guidance schedule x strength jointly with the variant's search space (MR or truncation)."""
    o = self.o
    _, search, mr = VARIANTS[variant]
    space = search_space(o, search, mr)
    scores, seen, runs = {}, {}, 0
    for i, setting in enumerate(space):
      for schedule in o['schedules']:
        for cfg in o['cfg_grid']:
          values = sampler_values(schedule, cfg, setting)
          # Strength 0 is the same sampler under every schedule: scored once (and counted once).
          guidance = (0.0, i) if cfg == 0 else (schedule, cfg, i)
          name = f'selection/{variant}/{schedule}_cfg{cfg:g}_{setting_name(setting)}'
          if guidance in seen:
            scores[(schedule, cfg, i)] = seen[guidance]
            continue
          r = self.units(name, lambda v=values: self.scorer.score(model, v, o['val_per_class'], VALIDATION_SEED,
                                                                  'train'))
          scores[(schedule, cfg, i)] = seen[guidance] = r['fd']
          runs += 1
    schedule, cfg, i = select_guidance(scores, o['schedules'])
    return {'schedule': schedule, 'cfg': cfg, 'setting': space[i], 'search': search,
            'values': sampler_values(schedule, cfg, space[i]), 'model': model['export'],
            'validation_seed': VALIDATION_SEED, 'real_split': 'train', 'per_class': o['val_per_class'],
            'validation_runs': runs,
            'scores': [{'schedule': s, 'cfg': c, 'setting': space[k], 'fd': v} for (s, c, k), v in scores.items()]}

  def teacher(self, markov: list[dict], choice: dict) -> dict:
    """The markov model with the lowest validation score under (c)'s choice."""
    values = choice['values']
    scores = []
    for m in markov:
      r = self.units(f'selection/teacher/seed{m["seed"]}',
                     lambda m=m: self.scorer.score(m, values, self.o['val_per_class'], VALIDATION_SEED, 'train'))
      scores.append((r['fd'], m['seed'], m))
    best = min(scores, key=lambda t: (t[0], t[1]))
    return {**best[2], 'validation_scores': {str(s): fd for fd, s, _ in scores}}

  # --- test evaluation ---
  def evaluate(self, variant: str, models: list[dict], values: dict) -> dict:
    """Test-split runs of every model x sampling seed, keyed by (train_seed, sampling_seed) for pairing."""
    runs = []
    for m in models:
      for s in self.o['sample_seeds']:
        unit = f'evaluation/{variant}/train{m["seed"]}_sample{s}'
        r = self.units(unit, lambda m=m, s=s: self.scorer.score(m, values, self.o['test_per_class'], s, 'test'))
        if 'precision' not in r:  # Kept from a run of an earlier version, which scored fd only.
          raise ConfigError(f'{files.join(self.workdir, unit)}/result.json has no precision/recall (an earlier '
                            f'version wrote it): remove {files.join(self.workdir, "evaluation")} to score again')
        runs.append({**r, 'train_seed': m['seed']})
    return {'runs': runs}

  def cost(self, variant: str, model: dict, values: dict) -> dict:
    def fn():
      traced = float(values['cfg']) != 0
      sampler, var_params, vae_params, compiled, stats, bs, guidance = self.scorer.program(model, values, traced)
      labels = self.scorer.labels(sampler, np.arange(bs, dtype=np.int32) % sampler.var_config.num_classes)
      call = lambda rng: compiled(var_params, vae_params, labels, rng, *([guidance] if traced else []))
      jax.block_until_ready(call(batch_rng(0, 0)))  # Warm-up.
      times = []
      for r in range(self.o['timing_repeats']):
        t0 = time.perf_counter()
        jax.block_until_ready(call(batch_rng(0, r + 1)))
        times.append(time.perf_counter() - t0)
      t = statistics.median(times)
      return {'batch': bs, 'seconds_per_batch': t, 'images_per_s': bs / t, 'seconds_per_image': t / bs,
              'compiled_memory_bytes': needed_bytes(stats['memory']), 'memory': stats['memory'],
              'forward_passes_per_image': sampler.forward_passes(),
              'sampler': dataclasses.asdict(sampler.config), 'guidance_traced': traced,
              'device': str(jax.devices()[0].device_kind),
              'devices': jax.device_count()}
    return self.units(f'cost/{variant}', fn)

  # --- everything ---
  def run(self) -> dict:
    t_all = time.time()
    o = self.o
    p = plan(self.base)
    logging.info('ablation: %d models, %s training steps of %d examples; %d validation runs (%s images, %s '
                 'image-passes with MR refine\'s), %d test runs (%s images, at most %s image-passes); compilation '
                 'cache %s', p['models'], f'{p["training_steps"]:,}', p['examples_per_step'], p['validation_runs'],
                 f'{p["validation_images"]:,}', f'{p["validation_image_passes"]:,}', p['test_runs'],
                 f'{p["test_images"]:,}', f'{p["test_image_passes_at_most"]:,}', compile_cache(self.workdir))
    self.progress = self.units.on_done = Progress(p)
    self.tok = self.tokenizer()
    self.scorer = Scorer(self.base, self.workdir, self.tok)
    c = self.cfg()
    c.tokenizer.checkpoint = self.tok
    self.pn = tuple(tokenizer_for_model(c).config.patch_nums)
    self.cache_train = self.tokens('train', self.pn, 'train')
    self.cache_test = self.tokens('test', self.pn, 'test')
    models = {kind: [self.model(kind, s) for s in o['train_seeds']] for kind in ('causal', 'markov', 'refine')}
    for kind, (_, _, start) in FINETUNED.items():
      models[kind] = [self.model(kind, m['seed'], start=m) for m in models[start]]
    var_protocol = {k: PROTOCOLS['var'][k] for k in ('cfg', 'cfg_schedule')}
    # Each searching variant selects on its first training seed's model; the student's after it exists.
    selection = {v: self.select(v, models[kind][0]) for v, (kind, search, _) in VARIANTS.items()
                 if search and kind in models}
    teacher = self.teacher(models['markov'], selection['c'])
    self.student_pn = student_patch_nums(self.cfg().distill.patch_nums, self.pn)
    self.cache_student_train = self.tokens('train', self.student_pn, 'student_train')
    self.cache_student_test = self.tokens('test', self.student_pn, 'student_test')
    for kind in DISTILLED:
      models[kind] = [self.distilled(teacher, kind)]
    selection.update({v: self.select(v, models[kind][0]) for v, (kind, _, _) in VARIANTS.items() if kind in DISTILLED})
    heldout = {}
    for kind, ms in models.items():
      heldout[kind] = [self.heldout(f'{kind}_seed{m["seed"]}' if kind not in DISTILLED else kind, m)
                       for m in ms]
    variants = {}
    for v, (kind, search, _) in VARIANTS.items():
      values = (selection[v]['values'] if search else
                sampler_values(var_protocol['cfg_schedule'], var_protocol['cfg']))
      ev = self.evaluate(v, models[kind], values)
      cost = self.cost(v, models[kind][0], values)
      variants[v] = self.summarise(v, kind, values, ev, cost, models[kind], heldout[kind],
                                   selection.get(v), teacher if kind in DISTILLED else None)
    # Each student against its own teacher, the teacher sampled with the student's settings (same seeds).
    teachers = {v: self.evaluate(f'{v}_teacher', [teacher], variants[v]['sampler'])['runs']
                for v, (kind, _, _) in VARIANTS.items() if kind in DISTILLED}
    out = self.report(variants, selection, teacher, teachers)
    # What main prints: the headline numbers and where the rest is (ablation.json has everything).
    return {'outputs': out['outputs'], 'quick': out['quick'], 'seconds': round(time.time() - t_all, 1),
            'units_run': list(self.units.ran), 'units_kept': len(self.units.kept),
            'variants': {v: {'name': r['name'], 'fd_mean': r['fd']['mean'], 'fd_std': r['fd']['std'],
                             'class_consistency_mean': r['class_consistency']['mean'],
                             'images_per_s': r['images_per_s'], 'cfg': r['sampler']['cfg'],
                             'cfg_schedule': r['sampler']['cfg_schedule']}
                         for v, r in variants.items()}}

  def summarise(self, v, kind, values, ev, cost, models, heldout, selection, teacher) -> dict:
    runs = ev['runs']
    by_train = {}
    for r, m in zip(runs, [m for m in models for _ in self.o['sample_seeds']]):
      by_train.setdefault(m['seed'], []).append(r)
    fd = mean_std([r['fd'] for r in runs])
    cc = mean_std([r['class_consistency'] for r in runs])
    pr = {k: mean_std([r[k] for r in runs]) for k in ('precision', 'recall')}
    fd['std_over_train_seeds'] = mean_std([np.mean([r['fd'] for r in rs]) for rs in by_train.values()])['std']
    fd['std_over_sample_seeds'] = float(np.mean([mean_std([r['fd'] for r in rs])['std'] for rs in by_train.values()]))
    losses = np.asarray([h['loss'] for h in heldout], np.float64)
    rates = [m['steps_per_s'] for m in models if m.get('steps_per_s')]
    steps = models[0]['steps'] + (models[0].get('teacher_steps') or 0) + models[0].get('start_steps', 0)
    return {
        'name': NAMES[v], 'description': DESCRIPTIONS[v], 'model_kind': kind, 'sampler': values,
        'train_seeds': [m['seed'] for m in models], 'sample_seeds': list(self.o['sample_seeds']),
        'fd_name': runs[0]['fd_name'], 'fd': fd, 'class_consistency': cc, **pr,
        'heldout_token_loss': {'patch_nums': heldout[0]['patch_nums'], 'per_scale_mean': losses.mean(0).tolist(),
                             'per_scale_std': (losses.std(0, ddof=1) if len(losses) > 1 else 0 * losses[0]).tolist(),
                             'mean_loss': mean_std([h['mean_loss'] for h in heldout])},
        'train_step_seconds': 1.0 / float(np.mean(rates)) if rates else None,
        'training_steps': steps,
        'training_steps_note': ('teacher + student steps' if kind in DISTILLED else
                              f'{FINETUNED[kind][2]} model + fine-tune steps' if kind in FINETUNED else
                              'its own model, trained from scratch' if kind == 'refine' else 'one model'),
        'heldout_curves': {str(m['seed']): m.get('heldout_curve') for m in models},
        'plateau': plateau([m.get('heldout_curve') for m in models]),
        'images_per_s': cost['images_per_s'], 'seconds_per_image': cost['seconds_per_image'],
        'compiled_sampling_memory_bytes': cost['compiled_memory_bytes'],
        'forward_passes_per_image': cost['forward_passes_per_image'],
        'selection': selection, 'teacher': teacher and {'export': teacher['export'], 'seed': teacher['seed'],
                                                      'validation_scores': teacher['validation_scores']},
        'runs': runs}

  # --- outputs ---
  def report(self, variants, selection, teacher, teachers) -> dict:
    comps = comparisons(variants, teachers)
    c = self.cfg()
    out = {
        'command': ' '.join(sys.argv) if sys.argv else '', 'commit': _git_commit(),
        'quick': bool(c.ablation.quick),
        'protocol': {
          **{k: list(v) if isinstance(v, tuple) else v for k, v in self.o.items()},
          'validation_seed': VALIDATION_SEED, 'comparison_rule': (
              'paired differences over shared (training seed, sampling seed) runs averaged per training seed, '
              'mean and 95% CI (t over the training seeds); decisive when the fd CI excludes 0, equivalent when '
              f'it lies inside +-{RESOLUTION:.0%} of (a)\'s mean fd, else not decisive'),
          'selection_rule': 'lowest validation fd (val_per_class per class, validation seed, training-split '
          'reals) over guidance schedule x strength jointly with the variant\'s search (MR: thresholds x '
          'iterations; otherwise plain truncations, the same number of settings) on the first training seed\'s '
          'model; ties: smaller cfg, then the earlier schedule, then the earlier setting; applied to every '
          'training seed',
          'var_protocol': dict(PROTOCOLS['var']),
          'training_steps': self.steps, 'data': c.data.source, 'tokenizer': self.tok,
          'top_k': int(c.sampler.top_k), 'top_p': float(c.sampler.top_p),
          'test_split_reals': int(next(iter(variants.values()))['runs'][0]['real_examples'])},
      # Wall time of every unit, summed over the runs that did them (resumed runs included).
        'plan': plan(self.base),
        'unit_seconds': {'total': round(sum(self.units.seconds.values()), 1),
                       **{g: round(sum(t for u, t in self.units.seconds.items() if u.split('/')[0] == g), 1)
                          for g in sorted({u.split('/')[0] for u in self.units.seconds})}},
        # Seconds per training step and per sampled image-pass over the whole study: what sizes a preset.
        'rates': self.progress.rates(),
        'variants': variants, 'selection': selection, 'comparisons': comps,
        'teacher_runs': teachers,
        'teacher': {'export': teacher['export'], 'seed': teacher['seed'],
                  'validation_scores': teacher['validation_scores']},
        'outputs': {k: files.join(self.workdir, f'ablation.{k}') for k in ('json', 'md', 'png')}}
    if multihost.is_main_process():
      files.write_json(files.join(self.workdir, 'ablation.json'), out)
      files.write_text(files.join(self.workdir, 'ablation.md'), markdown(out))
      plot(variants, files.join(self.workdir, 'ablation.png'))
    return out


def markdown(out: dict) -> str:
  p = out['protocol']
  v0 = next(iter(out['variants'].values()))
  lines = [f'# VAR vs SDD ablation{" (quick: smoke-test sizes, not a result)" if out["quick"] else ""}', '',
           f'Command: `{out["command"]}`  ', f'Commit: `{out["commit"]}`  ',
           f'Wall time of its units: {out["unit_seconds"]["total"]:.0f} s (' +
           ', '.join(f'{k} {v:.0f} s' for k, v in out['unit_seconds'].items() if k != 'total') + ')', '',
           f'Training: {p["training_steps"]} steps per model, training seeds {p["train_seeds"]}; sampling seeds '
           f'{p["sample_seeds"]} x {p["test_per_class"]} per class, scored against {p["test_split_reals"]} test-split '
           f'images. Selection: {p["selection_rule"]}; guidance grid {p["cfg_grid"]} x {p["schedules"]}, MR '
           f'{p["mr_thresholds"]} x {p["mr_iterations"]}, truncations {p["truncations"]}. '
           f'`{v0["fd_name"]}` is the proxy classifier\'s Fréchet distance (not an FID): lower is better.', '',
           '| | variant | guidance | MR / truncation | ' + v0['fd_name'] + ' | class consistency | precision | recall | held-out '
           'token loss per scale | plateau | train step s | training steps | images/s | compiled sampling MiB | '
           'passes/image |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for v, r in out['variants'].items():
    s = r['sampler']
    mr = f'{s["mr_mode"]} {s["mr_threshold"]:g} x {s["mr_iterations"]}' if s['mr_iterations'] else 'off'
    if not s['mr_iterations'] and r['selection'] and r['selection'].get('search') == 'truncation':
      mr += ', ' + setting_name(r['selection']['setting'])
    loss = ' '.join(f'{x:.3f}' for x in r['heldout_token_loss']['per_scale_mean'])
    mem = r['compiled_sampling_memory_bytes']
    step = r['train_step_seconds']
    lines.append(f'| ({v}) | {r["name"]}: {r["description"]} | {s["cfg_schedule"]} {s["cfg"]:g} | {mr} | '
                 f'{r["fd"]["mean"]:.3f} ± {r["fd"]["std"]:.3f} (n={r["fd"]["n"]}) | '
                 f'{r["class_consistency"]["mean"]:.3f} ± {r["class_consistency"]["std"]:.3f} | '
                 f'{r["precision"]["mean"]:.3f} ± {r["precision"]["std"]:.3f} | '
                 f'{r["recall"]["mean"]:.3f} ± {r["recall"]["std"]:.3f} | {loss} | '
                 f'{"yes" if r["plateau"]["reached"] else "no"} | '
                 f'{"n/a" if step is None else f"{step:.4f}"} | {r["training_steps"]} ({r["training_steps_note"]}) | '
                 f'{r["images_per_s"]:.1f} | {"n/a" if mem is None else f"{mem / 2 ** 20:.1f}"} | '
                 f'{r["forward_passes_per_image"]} |')
  lines += ['', 'Mean ± standard deviation over every (training seed, sampling seed) run; every variant uses every '
            'training seed\'s model but (f) and (o), one student each. Precision and recall: improved k-NN '
            '(k = 3) manifolds in the proxy classifier\'s feature space. Plateau: every model\'s held-out token '
            'loss improved by < 1% over its last fifth of training.', '',
            f'## Findings (paired; fd lower is better; {p["comparison_rule"]})', '',
            'A comparison is "not decisive" when its interval holds 0 and reaches past the margin: it neither '
            'shows a difference nor rules one out.', '']
  lines += comparison_lines(out['comparisons'])
  return '\n'.join(lines) + '\n'


def plot(variants: dict, path: str, size=(960, 480), pr_width: int = 480):
  """Left: quality (fd, lower is better) against sampling seconds per image, a point per variant with ±std
  bars. Right (pr_width pixels): precision against recall, a point per variant (truncation and masked
  resampling trade recall for precision; fd alone hides which way a variant moved).

  Points carry their letter only, and a legend on the right names them, so close points (a guided
  variant that selected VAR's own protocol sits on top of its unguided one) do not write over each
  other and no name runs off the image."""
  xs = [r['seconds_per_image'] for r in variants.values()]
  lo = [r['fd']['mean'] - r['fd']['std'] for r in variants.values()]
  hi = [r['fd']['mean'] + r['fd']['std'] for r in variants.values()]
  right = 300  # The legend's margin.
  chart = Chart(size, (0.0, max(xs) * 1.1 or 1.0), (min(0.0, min(lo)), max(hi) * 1.1 or 1.0), right=right,
                x_title='sampling seconds per image', x_title_at=(size[0] - right) // 2 - 40,
                y_title='fd (proxy), lower is better; bars: ± std', x_tick='{:.2g}', y_tick='{:.3g}')
  d, px, py, (w, _), top = chart.draw, chart.px, chart.py, size, chart.top
  colours = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22',
             '#17becf', '#393b79', '#ad494a', '#637939', '#8c6d31', '#7b4173']
  points = [(px(r['seconds_per_image']), py(r['fd']['mean'])) for r in variants.values()]
  taken = []  # Label corners already used: each letter goes to the first free spot around its point.

  def free(p):
    return (all(abs(p[0] - tx) >= 24 or abs(p[1] - ty) >= 11 for tx, ty in taken) and
            all(not (p[0] - 4 <= qx <= p[0] + 22 and p[1] - 4 <= qy <= p[1] + 14) for qx, qy in points))

  for i, ((v, r), col) in enumerate(zip(variants.items(), itertools.cycle(colours))):
    x, m, s = px(r['seconds_per_image']), r['fd']['mean'], r['fd']['std']
    d.line([(x, py(m - s)), (x, py(m + s))], fill=col, width=2)
    d.ellipse([x - 4, py(m) - 4, x + 4, py(m) + 4], fill=col)
    spots = [(x + 6, py(m) - 6), (x - 28, py(m) - 6), (x + 6, py(m) - 18), (x - 28, py(m) - 18),
             (x + 6, py(m) + 6), (x - 28, py(m) + 6)]
    spot = next((p for p in spots if free(p)), spots[0])
    taken.append(spot)
    d.text(spot, f'({v})', fill=col)
    d.text((w - right + 20, top + 16 * i),
           f'({v}) {r["name"]}: {m:.2f} ± {s:.2f}, {r["images_per_s"]:.1f} img/s', fill=col)
  pr = Chart((pr_width, size[1]), (0.0, 1.0), (0.0, 1.0), x_title='recall', x_title_at=pr_width // 2 - 20,
             y_title='precision (k-NN manifolds, proxy features)', x_tick='{:.2g}', y_tick='{:.2g}')
  for (v, r), col in zip(variants.items(), itertools.cycle(colours)):
    x, y = pr.px(r['recall']['mean']), pr.py(r['precision']['mean'])
    pr.draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=col)
    pr.draw.text((x + 6, y - 6), f'({v})', fill=col)
  from PIL import Image  # pylint: disable=import-outside-toplevel
  both = Image.new('RGB', (size[0] + pr_width, size[1]), 'white')
  both.paste(chart.image, (0, 0))
  both.paste(pr.image, (size[0], 0))
  files.save_image(path, both)


def run(config, workdir: str) -> dict:
  config = with_defaults(config)
  try:
    return _Ablation(config, workdir).run()
  except _Stopped as e:
    s = e.summary
    return {'stopped_by': s.get('stopped_by') or 'request', 'complete': False, 'stage': s.get('stage'),
            'end_step': s.get('end_step')}
