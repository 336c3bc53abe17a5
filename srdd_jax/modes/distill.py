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


from absl import logging

from srdd_jax import files
from srdd_jax.config import ConfigError, with_defaults
from srdd_jax.convert import params_io
from srdd_jax.convert.loading import check_tokenizer_of
from srdd_jax.data.token_cache import MANIFEST
from srdd_jax.diffusion.grids import SampleGrids
from srdd_jax.train import distill, driver
from srdd_jax.train import transformer_setup as setup
from srdd_jax.train.transformer_task import DistillTask, TransformerTask
from srdd_jax.transformer.config import VARConfig
from srdd_jax.transformer.model import blocks_layout


def teacher_config(config) -> VARConfig:
  """The VARConfig of config.distill.teacher from its model.json, no weight read; errors name the key."""
  path = config.distill.teacher
  if not path:
    raise ConfigError('config.distill.teacher is empty: give a transformer directory (WORKDIR/export/step_<n> '
                      'of a training run, or convert_var\'s output)')
  if not files.isdir(path):
    raise ConfigError(f'config.distill.teacher={path!r} does not exist')
  try:
    return VARConfig(**params_io.check_model_dir(path, 'var')['config'])
  except (FileNotFoundError, ValueError, TypeError) as e:
    raise ConfigError(f'config.distill.teacher: {e}') from e


def load_teacher(config):
  """(VARConfig, params) of config.distill.teacher; errors name the key."""
  teacher_config(config)
  try:
    return params_io.load_var(config.distill.teacher)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f'config.distill.teacher: {e}') from e


def check_cache(directory: str, patch_nums) -> None:
  """A cache at another schedule is refused before anything loads, naming the command that writes one."""
  path = files.join(directory, MANIFEST)
  if not files.isfile(path):
    return  # TokenCache says what is wrong with it.
  have = tuple(files.read_json(path)['patch_nums'])
  if have != tuple(patch_nums):
    want = ','.join(map(str, patch_nums))
    raise ConfigError(f'config.distill.token_cache={directory!r} holds tokens for patch_nums {have}, the student '
                      f'uses {tuple(patch_nums)}: write one with --mode=tokenize '
                      f'--config.model.patch_nums="({want})" --config.tokenize.out_dir=DIR')


def student_and_teacher(config, vq, teacher, teacher_params, student_pn):
  """(student VARConfig, teacher VARConfig, teacher params): the teacher's architecture run as config.model
  says (dtype, scan, remat, attention), its parameters in that layout; the student at `student_pn` with
  config.model's label dropout and drop path."""
  m = config.model
  t = teacher
  if (t.vocab_size, t.z_channels) != (vq.vocab_size, vq.z_channels):
    raise ConfigError(f'config.distill.teacher={config.distill.teacher!r} predicts {t.vocab_size} codes of '
                      f'{t.z_channels} channels; the tokenizer (config.tokenizer.checkpoint) has '
                      f'{vq.vocab_size} of {vq.z_channels}')
  run = dict(dtype=m.dtype, scan_blocks=bool(m.scan), remat=m.remat, attention=m.attention)
  teacher = distill.student_config(t, t.patch_nums, **run)
  try:
    teacher_params = blocks_layout(teacher_params, teacher)
  except ValueError as e:
    raise ConfigError(f'config.distill.teacher={config.distill.teacher!r}: {e}') from e
  student = distill.student_config(teacher, student_pn, cond_drop_rate=float(m.cond_drop_rate),
                                   drop_path_rate=float(m.drop_path_rate))
  return student, teacher, teacher_params


def task(config, workdir: str) -> DistillTask:
  """The task of a resolved config (`with_defaults`; its model and data sections are set to the student's
  here): every piece built, every value checked."""
  d = config.distill
  teacher, teacher_params = load_teacher(config)
  pn = distill.student_patch_nums(d.patch_nums, teacher.patch_nums)
  if d.token_cache:
    check_cache(d.token_cache, pn)
  config.model.patch_nums = pn  # The tokenizer quantizes, and the data are read, at the student's scales.
  config.model.num_classes = teacher.num_classes
  config.data.token_cache = d.token_cache
  mesh, tok = setup.mesh_and_tokenizer(config)
  check_tokenizer_of(d.teacher, 'config.distill.teacher', tok)  # The student learns the teacher's tokens.
  vq = tok.config
  var_config, teacher, teacher_params = student_and_teacher(config, vq, teacher, teacher_params, pn)
  data = setup.training_data(config, tok)
  total, optim, progressive = setup.schedule(config, data.num_examples, var_config.num_scales)
  # A student of a refine teacher keeps its (copied) stream but trains the plain next-scale task. The
  # trainer checks config.distill.kl_weight and kl_temperature against the teacher.
  trainer = setup.trainer(distill.DistillTrainer, config, var_config, vq, optim, mesh, progressive,
                          teacher=teacher, teacher_params=teacher_params, kl_weight=float(d.kl_weight),
                          kl_temperature=float(d.kl_temperature), teacher_path=d.teacher)
  grids = SampleGrids(config, var_config, vq, mesh, workdir) if int(config.train.sample_every) > 0 else None
  heldout = setup.heldout_set(config, tok, var_config, total)
  setup.log_run(config, data, total, var_config, mesh)
  logging.info('distill: teacher %s %s -> student %s (%d -> %d tokens), KL weight %g', d.teacher,
               teacher.patch_nums, pn, teacher.seq_len, var_config.seq_len, trainer.kl_weight)
  out = DistillTask(TransformerTask(trainer, tok.params, data, workdir, total_steps=total, grids=grids,
                                    heldout=heldout, tokenizer=tok.identity(), **setup.loop_settings(config)))
  out.inputs = setup.training_inputs(config, tok, ('model', 'train', 'optim', 'data', 'distill'),
                                     teacher=params_io.model_identity(d.teacher))
  return out


def run(config, workdir: str, stop_after_steps: int | None = None, return_state: bool = False) -> dict:
  """Distils to config.train.steps (or stops after `stop_after_steps` steps of this call, saving)."""
  return driver.run(task(with_defaults(config), workdir), stop_after_steps=stop_after_steps,
                    return_state=return_state)
