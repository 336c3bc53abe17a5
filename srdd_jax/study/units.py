"""The study's units of work, each run once in the workdir and resumable: the tokenizer, the token caches,
the models (one per model and training seed), and per (arm, training seed) its validation points, its
test runs and their summary; per arm a timing of its sampler.

Every unit records what it was made from with the mechanism `--mode=all` records its stages with
(parallel/workdir.Units and its inputs file): run again with another setting, a sampling unit (a
validation point, a test run, a summary, a timing) is made again, and a unit that holds training work (a
token cache, a model, even one cut short) is refused with exit status 2 naming the change. A summary
pairs only the runs made from the current inputs: stale and new never meet in a comparison.

  WORKDIR/inputs.json                              tokenizer, token caches, models, timings
  WORKDIR/models/<model>_seed<s>/                  a training run (checkpoints, metrics.jsonl, export/)
  WORKDIR/arms/<arm>/seed<s>/inputs.json           the records of that (arm, training seed)
  WORKDIR/arms/<arm>/seed<s>/validation/<setting>/result.json   a validation point (training-split reals)
  WORKDIR/arms/<arm>/seed<s>/test/sample<k>/result.json         a test run (test-split reals)
  WORKDIR/arms/<arm>/seed<s>/summary/result.json   the (arm, seed)'s numbers: choice, runs, model
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Callable

import jax
import numpy as np

from srdd_jax import files
from srdd_jax.config import with_defaults
from srdd_jax.convert.loading import tokenizer_for_model
from srdd_jax.convert.params_io import model_identity
from srdd_jax.diffusion.sampler import batch_rng
from srdd_jax.parallel.compile import needed_bytes
from srdd_jax.parallel.workdir import Units
from srdd_jax.study import plan as study_plan
from srdd_jax.study.scoring import Scorer
from srdd_jax.train import driver
from srdd_jax.train.distill import student_patch_nums
from srdd_jax.train.milestones import ExportAlso

INPUTS_FILE = 'inputs.json'
# config.train keys that say how a run is logged and saved, not what it trains: left out of a model's
# recorded inputs, so that changing them neither redoes nor refuses anything.
_BOOKKEEPING = ('log_every', 'checkpoint_every', 'keep_checkpoints', 'sample_every', 'heldout_every',
                'heldout_cache', 'heldout_examples', 'steps', 'init_from')


@dataclasses.dataclass(frozen=True)
class Stages:
  """The runners' pieces the study composes, handed in by srdd_jax/modes/study.py: the transformer's and
  the student's training tasks (config, workdir) -> driver.Task, and the token cache's and tokenizer's
  runners (config, workdir) -> summary."""
  train_task: Callable
  distill_task: Callable
  tokenize: Callable
  train_tokenizer: Callable


class Stopped(Exception):
  """A training unit stopped by SIGTERM or Ctrl-C before its end (its checkpoint saved)."""

  def __init__(self, summary):
    super().__init__('stopped')
    self.summary = summary


def identity(directory: str) -> dict:
  """What tells one model export (or tokenizer) from another: params_io.model_identity, the identity
  --mode=all's stages record."""
  return model_identity(directory)


def metrics_summary(metrics_path: str) -> dict:
  """From a training run's metrics.jsonl: the held-out loss curve ([[step, loss], ...], the last record
  of a step wins: a resumed run logs its checkpoint's step again), the last per-scale held-out loss, and
  the median training rate of the logged windows (the first left out when there are others: it holds the
  compilation)."""
  by_step, per_scale, rates = {}, None, []
  if files.isfile(metrics_path):
    with files.open(metrics_path) as f:
      for r in map(json.loads, f):
        if 'heldout_loss' in r:
          by_step[int(r['step'])] = float(r['heldout_loss'])
          per_scale = r.get('heldout_loss_per_scale')
        if 'steps_per_s' in r:
          rates.append(float(r['steps_per_s']))
  rates = rates[1:] if len(rates) > 1 else rates
  return {'heldout_curve': [[s, by_step[s]] for s in sorted(by_step)],
          'heldout_loss': by_step[max(by_step)] if by_step else None, 'heldout_loss_per_scale': per_scale,
          'steps_per_s': float(statistics.median(rates)) if rates else None}


class Work:
  """The units of one study: `config` the base config, `o` its checked options (plan.options)."""

  def __init__(self, config, workdir: str, stages: Stages, o: dict, progress):
    self.base, self.workdir, self.stages, self.o, self.progress = config, workdir, stages, o, progress
    self.units = Units(workdir, label='study: unit', inputs_file=INPUTS_FILE)
    self.units.on_done = progress
    self.identities = {}
    self.arm_units = []  # (name prefix, Units) of every (arm, seed): what ran and what was kept.
    c = self.cfg()
    # What every sampling unit records beside its own settings, read once (a resolved config per unit
    # cost seconds in a small study).
    self.sampler_base = c.sampler.to_dict()
    self.eval_inputs = {k: c.eval[k] for k in ('proxy_examples', 'proxy_epochs', 'batch_size')}
    self.data_inputs = {k: v for k, v in c.data.to_dict().items() if k != 'token_cache'}

  def cfg(self):
    return with_defaults(self.base)

  # --- shared stages ---
  def prepare(self) -> None:
    """The tokenizer, the scorer and the token caches every model reads."""
    self.tok = self.tokenizer()
    self.scorer = Scorer(self.base, self.workdir, self.tok)
    c = self.cfg()
    c.tokenizer.checkpoint = self.tok
    self.pn = tuple(tokenizer_for_model(c).config.patch_nums)
    self.caches = {'train': self.tokens('train', self.pn, 'train'), 'test': self.tokens('test', self.pn, 'test')}
    if any(m.teacher for m in self.o['models']):
      self.student_pn = tuple(student_patch_nums(c.distill.patch_nums, self.pn))
      self.caches['student_train'] = self.tokens('train', self.student_pn, 'student_train')
      self.caches['student_test'] = self.tokens('test', self.student_pn, 'student_test')

  def tokenizer(self) -> str:
    c = self.cfg()
    if c.tokenizer.checkpoint:
      return c.tokenizer.checkpoint

    def fn():
      s = self.stages.train_tokenizer(self.cfg(), self.workdir)
      if not s.get('export'):
        raise Stopped({**s, 'stage': 'tokenizer'})
      return {'export': s['export'], 'steps': s['end_step'], 'eval_psnr_end': s.get('eval_psnr_end')}
    inputs = {'config.tokenizer': c.tokenizer.to_dict(), 'config.tokenizer_train': c.tokenizer_train.to_dict(),
              'config.data': self.data_inputs}
    return self.units('tokenizer', fn, inputs=inputs, redo=False)['export']

  def tokens(self, split: str, patch_nums, name: str) -> str:
    out_dir = files.join(self.workdir, 'tokens', name)

    def fn():
      c = self.cfg()
      c.tokenizer.checkpoint = self.tok
      c.model.patch_nums = tuple(patch_nums)
      c.tokenize.out_dir, c.tokenize.split = out_dir, split
      s = self.stages.tokenize(c, self.workdir)
      return {'out_dir': out_dir, 'split': split, 'patch_nums': list(patch_nums), 'count': s.get('count')}
    c = self.cfg()
    inputs = {'tokenizer': identity(self.tok), 'split': split, 'patch_nums': list(patch_nums),
              'config.data': self.data_inputs, 'max_examples': int(c.tokenize.max_examples),
              'flips': bool(c.tokenize.flips)}
    return self.units(f'tokens/{name}', fn, inputs=inputs, redo=False)['out_dir']

  # --- models ---
  def model(self, model, seed: int, done: dict) -> dict:
    """`model` of training seed `seed`, from scratch or from its start / teacher of the same seed
    (`done`: model name -> its result); its export at S/2 too when the model table says so."""
    name = f'models/{model.name}_seed{seed}'
    root = files.join(self.workdir, name)
    steps = self.o['steps'][model.name]
    start, teacher = done.get(model.start), done.get(model.teacher)
    half = steps // 2 if model.half else None
    a = self.cfg().ablation

    def config():
      c = self.cfg()
      c.seed, c.tokenizer.checkpoint, c.train.steps = seed, self.tok, steps
      student = bool(model.teacher)
      c.train.heldout_cache = self.caches['student_test' if student else 'test']
      c.train.heldout_every = max(1, steps // max(1, int(a.heldout_points)))
      c.train.heldout_examples = int(a.heldout_examples)
      if student:
        c.distill.teacher = teacher['export']
        c.distill.token_cache = self.caches['student_train']
        c.distill.kl_weight = float(a.distill_kl_weight) if model.kl else 0.0
      else:
        c.data.token_cache = self.caches['train']
        c.model.mask, c.model.refine = model.mask, model.refine
        c.train.init_from = start['export'] if start else ''
      return c
    c = config()
    inputs = {'model': dataclasses.asdict(model), 'seed': seed, 'steps': steps, 'half_export_step': half,
              'tokens': files.absolute(self.caches['student_train' if model.teacher else 'train']),
              'tokenizer': self.identity(self.tok),
              'start': identity(start['export']) if start else None,
              'teacher': identity(teacher['export']) if teacher else None,
              'config.model': {k: v for k, v in c.model.to_dict().items() if k != 'checkpoint'},
              'config.train': {k: v for k, v in c.train.to_dict().items() if k not in _BOOKKEEPING},
              'config.optim': c.optim.to_dict(),
              'config.distill': {k: v for k, v in c.distill.to_dict().items() if k not in ('teacher', 'token_cache')}
              if model.teacher else None}
    task = self.stages.distill_task if model.teacher else self.stages.train_task

    def train():
      t = task(config(), root)
      if half:
        t = ExportAlso(t, [half])
      s = driver.run(t)
      if not s.get('complete'):
        raise Stopped({**s, 'stage': name})
      return s, t.exports()[half] if half else None

    def fn():
      # The checkpoints, too, are refused when made from other inputs (a run cut short, then changed).
      s, half_export = self.units.timed(f'{name}/checkpoints', train, inputs=inputs,
                                        where=files.join(root, 'checkpoints'))
      m = metrics_summary(files.join(root, 'metrics.jsonl'))
      before = start or teacher
      return {'model': model.name, 'seed': seed, 'export': s['export'], 'steps': steps,
              'total_steps': steps + (before['total_steps'] if before else 0),
              'half_export': half_export, 'half_steps': half,
              'start': before and {'model': model.start or model.teacher, 'export': before['export'],
                                   'total_steps': before['total_steps']},
              'kl_weight': float(c.distill.kl_weight) if model.teacher else None,
              'last_loss': s.get('last_loss'), 'patch_nums': list(self.student_pn if model.teacher else self.pn), **m}
    return self.units(name, fn, inputs=inputs, redo=False)

  # --- an arm on one training seed ---
  def sampling_inputs(self, export: str, values: dict, per_class: int, seed: int, split: str) -> dict:
    return {'model': self.identity(export), 'tokenizer': self.identity(self.tok),
            'sampler': {**self.sampler_base, **values}, 'per_class': per_class, 'sampling_seed': seed,
            'real_split': split, 'config.data': self.data_inputs, 'config.eval': self.eval_inputs}

  def identity(self, export: str) -> dict:
    """identity(export), read once per export: an export is written once and never replaced."""
    if export not in self.identities:
      self.identities[export] = identity(export)
    return self.identities[export]

  def arm(self, arm, seed: int, model: dict) -> dict:
    """The arm on `model` (the result of its model's training seed `seed`): its choice on validation
    samples (each candidate a unit), its test runs (each sampling seed a unit), and their summary."""
    root = files.join(self.workdir, 'arms', arm.key, f'seed{seed}')
    units = Units(root, label=f'study: {arm.key} seed {seed}:', inputs_file=INPUTS_FILE)
    prefix = f'arms/{arm.key}/seed{seed}/'
    units.on_done = lambda name, *rest: self.progress(prefix + name, *rest)
    self.arm_units.append((prefix, units))
    o = self.o
    export = model['half_export'] if arm.half else model['export']
    candidates = study_plan.candidates(arm, o)
    selection, values = None, candidates[0]
    if arm.selects:
      scores = []
      for v in candidates:
        r = units(f'validation/{study_plan.setting_name(v)}',
                  lambda v=v: self.scorer.score(export, v, o['val_per_class'], study_plan.VALIDATION_SEED, 'train'),
                  inputs=self.sampling_inputs(export, v, o['val_per_class'], study_plan.VALIDATION_SEED, 'train'))
        scores.append((v, r['fd']))
      values = study_plan.choose(scores)
      selection = {'validation_seed': study_plan.VALIDATION_SEED, 'real_split': 'train',
                   'per_class': o['val_per_class'], 'runs': len(scores),
                   'scores': [{'sampler': v, 'fd': fd} for v, fd in scores]}
    runs, recorded = [], {}
    for s in o['sample_seeds']:
      recorded[f'sample{s}'] = self.sampling_inputs(export, values, o['test_per_class'], s, 'test')
      r = units(f'test/sample{s}', lambda s=s: self.scorer.score(export, values, o['test_per_class'], s, 'test'),
                inputs=recorded[f'sample{s}'])
      runs.append({**r, 'train_seed': seed})
    steps = model['half_steps'] if arm.half else model['total_steps']
    summary = {'arm': arm.key, 'group': arm.group, 'description': arm.description, 'model': model['model'],
               'train_seed': seed, 'export': export, 'training_steps': steps, 'sampler': values,
               'selection': selection, 'runs': runs,
               'heldout_loss': None if arm.half else model.get('heldout_loss'),
               'heldout_loss_per_scale': None if arm.half else model.get('heldout_loss_per_scale'),
               'train_steps_per_s': model.get('steps_per_s'), 'patch_nums': model.get('patch_nums')}
    chosen = {study_plan.setting_name(x['sampler']): x['fd'] for x in selection['scores']} if selection else None
    return units('summary', lambda: summary, inputs={'validation': chosen, 'test': recorded})

  # --- timing ---
  def cost(self, arm, export: str, values: dict) -> dict:
    """Images per second, compiled memory and passes of the program that draws the arm's samples: the
    traced one when it is guided (a constant strength runs the same two halves), else its own program
    without the null-class half."""
    def fn():
      traced = float(values['cfg']) != 0
      sampler, var_params, vae_params, compiled, stats, bs, guidance = self.scorer.program(export, values, traced)
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
              'forward_passes_per_image': sampler.forward_passes(), 'sampler': dataclasses.asdict(sampler.config),
              'guidance_traced': traced, 'device': str(jax.devices()[0].device_kind), 'devices': jax.device_count()}
    inputs = {'model': self.identity(export), 'sampler': values, 'batch_size': int(self.eval_inputs['batch_size']),
              'timing_repeats': self.o['timing_repeats']}
    return self.units(f'cost/{arm.key}', fn, inputs=inputs)
