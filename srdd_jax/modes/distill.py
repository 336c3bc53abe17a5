"""`--mode=distill`: scale distillation (SPEC §6), a student on a subset of the teacher's scales.

  python -m srdd_jax.main --config=configs/fashion_mnist.py --workdir=DIR --mode=distill \\
      --config.distill.teacher=WORKDIR/export/step_<n> --config.tokenizer.checkpoint=WORKDIR/tokenizer/params

The teacher (config.distill.teacher) fixes the architecture; config.distill.patch_nums the student's scales
('' = every other teacher scale plus the last); config.model gives only how it runs (dtype, scan, remat,
attention, label dropout, drop path); config.train / config.optim how long and how fast it trains. The
student starts as a copy of the teacher (srdd_jax/train/distill.py: init_student) unless DIR holds a
checkpoint of this run, which wins (resume). Its data: images encoded at the student's scales in the
step, or config.distill.token_cache, a cache --mode=tokenize wrote with
--config.model.patch_nums=<the student's>. The export (DIR/export/step_<n>) samples and evaluates like
any transformer (config.model.checkpoint).
"""
from __future__ import annotations

import json
import os

from absl import logging

from srdd_jax.config import ConfigError, with_defaults
from srdd_jax.convert import params_io
from srdd_jax.data.token_cache import MANIFEST
from srdd_jax.modes.train import TransformerTask
from srdd_jax.train import distill, driver
from srdd_jax.transformer.model import blocks_layout


def load_teacher(config):
  """(VARConfig, params) of config.distill.teacher; errors name the key."""
  path = config.distill.teacher
  if not path:
    raise ConfigError('config.distill.teacher is empty: give a transformer directory (WORKDIR/export/step_<n> '
                      'of a training run, or convert_var\'s output)')
  if not os.path.isdir(path):
    raise ConfigError(f'config.distill.teacher={path!r} does not exist')
  try:
    return params_io.load_var(path)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f'config.distill.teacher: {e}') from e


def _check_cache(directory: str, patch_nums) -> None:
  """A cache at another schedule is refused before anything loads, naming the command that writes one."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    return  # TokenCache says what is wrong with it.
  with open(path) as f:
    have = tuple(json.load(f)['patch_nums'])
  if have != tuple(patch_nums):
    want = ','.join(map(str, patch_nums))
    raise ConfigError(f'config.distill.token_cache={directory!r} holds tokens for patch_nums {have}, the student '
                      f'uses {tuple(patch_nums)}: write one with --mode=tokenize '
                      f'--config.model.patch_nums="({want})" --config.tokenize.out_dir=DIR')


class DistillTask(TransformerTask):
  """The transformer task with a teacher's architecture, the student's scales and its initialisation."""

  name = 'distill'

  def __init__(self, config, workdir: str):
    config = with_defaults(config)
    d = config.distill
    teacher, teacher_params = load_teacher(config)
    pn = distill.student_patch_nums(d.patch_nums, teacher.patch_nums)
    if float(d.kl_weight) < 0:
      raise ConfigError(f'config.distill.kl_weight={d.kl_weight}: must be >= 0 (0 = no KL term)')
    if not float(d.kl_temperature) > 0:
      raise ConfigError(f'config.distill.kl_temperature={d.kl_temperature}: must be > 0')
    if float(d.kl_weight) > 0 and teacher.mask != 'markov':
      raise ConfigError(f'config.distill.kl_weight={d.kl_weight} needs a markov teacher; '
                        f'config.distill.teacher={d.teacher!r} is {teacher.mask}: its logits at a scale depend on '
                        'the keys and values of the scales the student skips, so no student input gives them '
                        '(set config.distill.kl_weight=0)')
    if d.token_cache:
      _check_cache(d.token_cache, pn)
    self.teacher, self._teacher_params, self.student_patch_nums = teacher, teacher_params, pn
    config.model.patch_nums = pn  # The tokenizer quantizes, and the data are read, at the student's scales.
    config.model.num_classes = teacher.num_classes
    config.data.token_cache = d.token_cache
    self.kl_weight, self.kl_temperature = float(d.kl_weight), float(d.kl_temperature)
    super().__init__(config, workdir)
    logging.info('distill: teacher %s %s -> student %s (%d -> %d tokens), KL weight %g', d.teacher,
                 teacher.patch_nums, pn, teacher.seq_len, self.var_config.seq_len, self.kl_weight)

  def model_config(self, config, vq):
    m = config.model
    t = self.teacher
    if (t.vocab_size, t.z_channels) != (vq.vocab_size, vq.z_channels):
      raise ConfigError(f'config.distill.teacher={config.distill.teacher!r} predicts {t.vocab_size} codes of '
                        f'{t.z_channels} channels; the tokenizer (config.tokenizer.checkpoint) has '
                        f'{vq.vocab_size} of {vq.z_channels}')
    run = dict(dtype=m.dtype, scan_blocks=bool(m.scan), remat=m.remat, attention=m.attention)
    self.teacher = teacher = distill.student_config(t, t.patch_nums, **run)
    try:
      self._teacher_params = blocks_layout(self._teacher_params, teacher)
    except ValueError as e:
      raise ConfigError(f'config.distill.teacher={config.distill.teacher!r}: {e}') from e
    return distill.student_config(teacher, self.student_patch_nums, cond_drop_rate=float(m.cond_drop_rate),
                                  drop_path_rate=float(m.drop_path_rate))

  def make_trainer(self, cls, *args, **kwargs):
    del cls  # A student of a refine teacher keeps its (copied) stream but trains the plain next-scale task.
    return distill.DistillTrainer(*args, teacher=self.teacher, teacher_params=self._teacher_params,
                                  kl_weight=self.kl_weight, kl_temperature=self.kl_temperature, **kwargs)

  def init(self):
    """The student copied from the teacher (a run's own checkpoint, when there is one, wins: the driver
    calls this only without one)."""
    logging.info('distill: the student starts from the teacher %s', self.teacher.patch_nums)
    return self.trainer.init_from(distill.init_student(self._teacher_params, self.teacher, self.var_config))

  def progress(self, m):
    kl = f' (ce {m["ce"]:.4f} kl {m["kl"]:.4f})' if 'kl' in m else ''
    return super().progress(m) + kl

  def summary(self):
    return {'teacher': self.teacher.patch_nums, 'student': self.var_config.patch_nums,
            'kl_weight': self.kl_weight}


def run(config, workdir: str, stop_after_steps: int | None = None, return_state: bool = False) -> dict:
  """Distils to config.train.steps (or stops after `stop_after_steps` steps of this call, saving)."""
  return driver.run(DistillTask(config, workdir), stop_after_steps=stop_after_steps, return_state=return_state)
