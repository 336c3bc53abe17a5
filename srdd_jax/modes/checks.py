"""The one validation of every mode: `validate` runs before anything is spent, by `--dry_run` (which then
stops) and by the real run (which then starts), so both refuse a bad input with the same line.

It checks, without loading a model's weights or a data set's images: the backend JAX is asked for; every
key the mode reads (the checks its runner calls, sentinels exact, counts bounded by what the step counter,
the samples asked for and the host's memory can hold); the files it reads (checkpoints by their
model.json, token caches, the samples file's header and labels, the images to edit); and the workdir's
layout (no file where the run keeps a folder, or the reverse). What needs the data or the weights
themselves (a batch larger than the data set, a token cache of another tokenizer, damaged weights) is
checked by the runner when it reads them, before its first step or sample.
"""
from __future__ import annotations

import difflib
import errno
import os
import types

import jax

from srdd_jax import files
from srdd_jax.config import ConfigError, load_file, with_defaults
from srdd_jax.convert import params_io
from srdd_jax.convert.loading import at_model_scales, check_checkpoint, tokenizer_architecture
from srdd_jax.data import pipeline
from srdd_jax.data.token_cache import MANIFEST
from srdd_jax.diffusion.generate import sampler_config_for, sampling_batch
from srdd_jax.diffusion.grids import grid_labels
from srdd_jax.evaluation import protocol
from srdd_jax.modes import all as all_stages
from srdd_jax.modes import distill, edit, reconstruct, sample, tokenize, train_tokenizer
from srdd_jax.modes import eval as evaluation
from srdd_jax.parallel import mesh as pm
from srdd_jax.study import arms as study_arms
from srdd_jax.study import plan as study_plan
from srdd_jax.study.units import INPUTS_FILE
from srdd_jax.tokenizer.api import tokenizer_config
from srdd_jax.train import tokenizer_settings
from srdd_jax.train import transformer_setup as setup
from srdd_jax.train.distill import check_kl, student_patch_nums
from srdd_jax.transformer.config import var_config as build_var_config


def backend() -> None:
  """JAX's backend starts: JAX_PLATFORMS naming one this host has not (cuda on a CPU host) is one line,
  not JAX's bare AssertionError at the first array."""
  try:
    jax.devices()
  except Exception as e:  # pylint: disable=broad-except  # AssertionError, RuntimeError: JAX's own words.
    platforms = os.environ.get('JAX_PLATFORMS', '')
    detail = str(e).strip().splitlines()[0] if str(e).strip() else f'{type(e).__name__}, no backend found'
    where = f'JAX_PLATFORMS={platforms!r}' if platforms else 'JAX'
    raise ConfigError(f'{where}: JAX cannot start that backend on this host ({detail[:300]}); unset JAX_PLATFORMS '
                      'for the default, or install the backend\'s JAX (e.g. pip install "jax[cuda12]")') from None


# --- files ---

def _model_dir(path: str, key: str) -> None:
  """A transformer directory named by `key` (init_from): present, a model.json of kind var."""
  if not files.isdir(path):
    raise ConfigError(f'{key}={path!r} does not exist: give a transformer directory (WORKDIR/export/step_<n> '
                      'of a training run, or convert_var output)')
  try:
    params_io.check_model_dir(path, 'var')
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f'{key}={path!r}: {e}') from e


def token_cache_present(directory: str, key: str) -> None:
  if not files.isdir(directory):
    raise ConfigError(f'{key}={directory!r} does not exist (write it with --mode=tokenize)')
  if not files.isfile(files.join(directory, MANIFEST)):
    raise ConfigError(f'{key}={directory!r} holds no finished token cache (no {MANIFEST}; a tokenize run cut '
                      'short: run it again to complete it)')


def _data(config) -> None:
  pipeline.check(config.data)
  d = config.data
  if d.source == 'folder' and d.path and not files.isdir(d.path):
    raise ConfigError(f'config.data.path={d.path!r} does not exist or is not a folder')


def diagnose(argv, e: Exception) -> str:
  """A one-line account of why a command line (srdd_jax.main's, srdd_jax.scaling's: both take --config
  and its overrides) cannot be parsed, naming the flag, the config file or the config key."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is not None:
    path = spec.partition(':')[0]
    if not files.isfile(path):
      return f'--config={spec}: no config file {path!r} (the configs are in configs/, e.g. configs/smoke.py)'
    try:
      config = load_file(spec)
    except Exception as load_error:  # pylint: disable=broad-except
      return f'--config={spec}: the config file cannot be loaded ({type(load_error).__name__}: {load_error})'
    for a in argv:
      if not a.startswith('--config.'):
        continue
      keys = a[len('--config.'):].split('=', 1)[0].split('.')
      node, where = config, 'config'
      for k in keys:
        if not hasattr(node, 'keys') or k not in node:
          known = sorted(node.keys()) if hasattr(node, 'keys') else []
          close = difflib.get_close_matches(k, known, n=1)
          hint = f' (did you mean {close[0]!r}?)' if close else f'; known: {known}'
          return f'{a.split("=", 1)[0]}: {where} has no key {k!r}{hint}'
        node, where = node[k], f'{where}.{k}'
  first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  if len(first) > 1 and first[0] == first[-1] == "'":  # A KeyError's repr.
    first = first[1:-1]
  return f'{first} (command line: {" ".join(argv[1:])})'


# --- the modes' checks ---

def tokenizer_training(config) -> None:
  pipeline.check(config.data)
  s = tokenizer_settings.train_settings(config)
  tokenizer_settings.validate_against(s, tokenizer_config(config), pm.mesh_from_config(config))
  _data(config)


def _run_files(config) -> None:
  """The files a transformer run (train, distill) reads besides its tokenizer: its data or token cache,
  its held-out cache, its start model."""
  if config.data.token_cache:
    token_cache_present(config.data.token_cache, 'config.data.token_cache')
  else:
    _data(config)
  if config.train.heldout_cache:
    token_cache_present(config.train.heldout_cache, 'config.train.heldout_cache')
  if config.train.init_from:
    _model_dir(config.train.init_from, 'config.train.init_from')


def _tokenizer_or_config(config):
  """The tokenizer's architecture from its model.json when it is there, else the config's: the values are
  checked against it first, the files (which a README's example names, and this machine may not have) last."""
  tok = config.tokenizer.checkpoint
  return tokenizer_architecture(config) if tok and files.isdir(tok) else tokenizer_config(config)


def transformer_values(config, mesh: bool = True) -> None:
  """A transformer run's values and architecture without its files: config.train and config.optim, the
  mesh (not for a scaling point planned for a TPU slice: `mesh` False) and config.model against the
  tokenizer (its model.json when it is there; a scaling study's is made by `prepare`)."""
  setup.check_ranges(config)
  if mesh:
    setup.check_mesh(config, pm.mesh_from_config(config))
  vq = at_model_scales(config, _tokenizer_or_config(config))
  build_var_config(config, vq.vocab_size, vq.z_channels)


def transformer_training(config) -> None:
  transformer_values(config)
  _run_files(config)
  vq = at_model_scales(config, tokenizer_architecture(config))
  if int(config.train.sample_every) > 0:
    grid_labels(config, int(config.model.num_classes), vq.image_size)


def distillation(config) -> None:
  """--mode=distill: the teacher (its model.json), the student's scales and KL term, and the run at the
  student's scales (its values, then its data, caches and tokenizer)."""
  teacher = distill.teacher_config(config)
  d = config.distill
  pn = student_patch_nums(d.patch_nums, teacher.patch_nums)
  check_kl(float(d.kl_weight), float(d.kl_temperature), teacher, d.teacher)
  c = with_defaults(config)
  c.model.patch_nums, c.model.num_classes, c.data.token_cache = pn, teacher.num_classes, d.token_cache
  setup.check_ranges(c)
  setup.check_mesh(c, pm.mesh_from_config(c))
  _run_files(c)
  vq = at_model_scales(c, tokenizer_architecture(c))
  if (teacher.vocab_size, teacher.z_channels) != (vq.vocab_size, vq.z_channels):
    raise ConfigError(f'config.distill.teacher={d.teacher!r} predicts {teacher.vocab_size} codes of '
                      f'{teacher.z_channels} channels; the tokenizer (config.tokenizer.checkpoint) has '
                      f'{vq.vocab_size} of {vq.z_channels}')
  if d.token_cache:
    distill.check_cache(d.token_cache, pn)
  if int(c.train.sample_every) > 0:
    grid_labels(c, int(teacher.num_classes), vq.image_size)


def _model(config):
  """The sampled model's mask, scales and classes: config.model over the checkpoint's model.json when it
  is there (`_checkpoints` then requires it)."""
  path = config.model.checkpoint
  saved = (params_io.model_meta(path).get('config') or {}) if path and files.isdir(path) else {}
  return types.SimpleNamespace(mask=config.model.mask or saved.get('mask', 'markov'),
                               patch_nums=tuple(saved.get('patch_nums', config.model.patch_nums)),
                               num_classes=int(saved.get('num_classes', config.model.num_classes)))


def _checkpoints(config) -> None:
  check_checkpoint(config, 'model')
  check_checkpoint(config, 'tokenizer')


def _data_parallel(config) -> int:
  return pm.data_parallel_size(pm.mesh_from_config(config))


def _host_memory() -> int | None:
  """This host's physical memory in bytes; None where the system does not say (os.sysconf is POSIX's)."""
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (AttributeError, ValueError, OSError):
    return None


def samples_fit(key: str, per: int, num_classes: int, image_size: int) -> None:
  """`per` samples (`key`) of each of `num_classes` classes of `image_size` px within this host's memory.
  Every process keeps all the images it samples (uint8, gathered from the mesh) until the end, and holds
  them twice while the batches are joined into one array (--mode=sample's grid is a second copy too): a
  count past half the memory failed with MemoryError after the models loaded, or after hours of sampling."""
  memory = _host_memory()
  if memory is None:  # Nothing to bound by: the run finds out itself.
    return
  held = 2 * image_size * image_size * 3  # Bytes of host memory each image takes at the peak.
  most = memory // (held * max(num_classes, 1))
  if per > most:
    raise ConfigError(f'{key}={per}: at most {most} for {num_classes} class(es) of this model\'s {image_size} px '
                      f'images on this host: the samples are kept in its memory ({memory / 2**30:.1f} GiB), twice '
                      f'while they are joined ({held} bytes an image)')


def sampling(config) -> None:
  model = _model(config)
  sampler_config_for(config.sampler, model)
  classes, per = sample.counts(config, model.num_classes)
  sampling_batch(int(config.sample.batch_size), len(classes) * per, _data_parallel(config), 'config.sample.batch_size')
  _checkpoints(config)
  samples_fit('config.sample.num_per_class', per, len(classes), tokenizer_architecture(config).image_size)


# The class counts of config.data's built-in sets, known without reading them (data/pipeline: digits and
# Fashion-MNIST, IDX or TFDS, 10 classes each); another source's (a folder, a TFDS set) is checked by the
# proxy classifier when it scores the labels.
_DATA_CLASSES = {'digits': 10, 'fashion_mnist': 10}


def _data_classes(config) -> int | None:
  """The number of classes of config.data (the proxy classifier's) where known without reading the data."""
  return _DATA_CLASSES.get(config.data.get('source'))


def evaluation_(config) -> None:
  o = evaluation.options(config)
  evaluation.check_data(config, o)
  if not o['samples']:
    model = _model(config)
    sampler_config_for(config.sampler, model)
    classes, per = evaluation.counts(o, model.num_classes)
    sampling_batch(int(o['batch_size']), len(classes) * per, _data_parallel(config), 'config.eval.batch_size')
  labels_required = evaluation.labels_required(o)
  n = protocol.check_inputs(o, labels_required, _data_classes(config) if labels_required else None)
  if not o['samples']:
    _checkpoints(config)
    samples_fit('config.eval.num_per_class', per, len(classes), tokenizer_architecture(config).image_size)
    n = len(classes) * per
  evaluation.check_count(o, n)


def editing(config) -> None:
  e = config.edit
  edit.check(e)
  model = _model(config)
  edit.check_keep_scales(e, len(model.patch_nums))
  sampler_config_for(config.sampler, model)
  edit.check_files(e)
  _checkpoints(config)
  edit.check_model(e, model.num_classes, tokenizer_architecture(config).image_size)


def reconstruction(config) -> None:
  reconstruct.check(config)


def tokenizing(config) -> None:
  _data(config)
  tokenize.check(config)
  at_model_scales(config, tokenizer_architecture(config))


def every_stage(config) -> None:
  """--mode=all: every stage's checks, on the config each stage will get (the tokenizer and the token
  cache the earlier stages make)."""
  if not config.tokenizer.checkpoint:
    tokenizer_training(config)
    vq = tokenizer_config(config)
  else:
    vq = at_model_scales(config, tokenizer_architecture(config))
  _data(config)
  tokenize.check(config)
  setup.check_ranges(config)
  setup.check_mesh(config, pm.mesh_from_config(config))
  vc = build_var_config(config, vq.vocab_size, vq.z_channels)
  model = types.SimpleNamespace(mask=vc.mask, patch_nums=vc.patch_nums, num_classes=vc.num_classes)
  sampler_config_for(config.sampler, model)
  classes, per = sample.counts(config, model.num_classes)
  sampling_batch(int(config.sample.batch_size), len(classes) * per, _data_parallel(config), 'config.sample.batch_size')
  samples_fit('config.sample.num_per_class', per, len(classes), vq.image_size)
  o = evaluation.options(config)
  evaluation.check_data(config, o)
  if set(o['metrics']) & set(protocol.INCEPTION_METRICS) or o['reference']:
    protocol.check_inputs({**o, 'samples': ''}, False)


def studying(config) -> None:
  """--mode=study: config.ablation (study/plan.options), and what its units run: the tokenizer's training
  (without a checkpoint), the models' training (each model's mask, refine stream and steps), the students'
  scales and KL term, and every sampler setting an arm samples with."""
  o = study_plan.options(config)
  if not config.tokenizer.checkpoint:
    tokenizer_training(config)
    vq = at_model_scales(config, tokenizer_config(config))
  else:
    vq = at_model_scales(config, tokenizer_architecture(config))
  c = with_defaults(config)
  c.data.token_cache = ''  # The study writes its own token caches.
  setup.check_mesh(c, pm.mesh_from_config(c))
  _run_files(c)
  pn = tuple(vq.patch_nums)
  for m in o['models']:
    c.model.mask, c.model.refine = m.mask, m.refine
    c.train.steps = o['steps'][m.name]
    setup.check_ranges(c)
    build_var_config(c, vq.vocab_size, vq.z_channels)
    if m.teacher:
      teacher = types.SimpleNamespace(mask=study_arms.MODELS[m.teacher].mask)
      student_patch_nums(config.distill.patch_nums, pn)
      check_kl(float(config.ablation.distill_kl_weight) if m.kl else 0.0, float(config.distill.kl_temperature),
               teacher, m.teacher)
  for arm in o['arms']:
    model = study_arms.MODELS[arm.model]
    scales = student_patch_nums(config.distill.patch_nums, pn) if model.teacher else pn
    target = types.SimpleNamespace(mask=model.mask, patch_nums=scales)
    for values in study_plan.candidates(arm, o):
      sampler = with_defaults(config).sampler
      sampler.update(values)
      sampler_config_for(sampler, target)
  bs = int(config.eval.batch_size)
  n_par = _data_parallel(config)
  if bs < 1 or bs % n_par:
    raise ConfigError(f'config.eval.batch_size={bs} must be a positive multiple of the data-parallel size {n_par}')


CHECKS = {
    'train_tokenizer': tokenizer_training,
    'tokenize': tokenizing,
    'train': transformer_training,
    'distill': distillation,
    'sample': sampling,
    'eval': evaluation_,
    'edit': editing,
    'reconstruct': reconstruction,
    'all': every_stage,
    'study': studying,
    'ablation': studying,
}


# --- the workdir ---

def _layout(mode: str, config) -> list[tuple[str, bool, str]]:
  """(path in the workdir, whether it is a folder, what the run does there) of what `mode` writes; the
  words of the runners' own checks (the driver's, parallel/workdir.Outputs')."""
  keeps = lambda what, folder: f'keeps its {what} ({"a folder" if folder else "a file"})'
  writes = lambda what: f'writes its {what} (a folder)'  # parallel/workdir.Outputs: replaced whole.
  run = [('checkpoints', True, keeps('checkpoints', True)), ('metrics.jsonl', False, keeps('metrics', False)),
         ('export', True, keeps('export', True))]
  proxy = [('proxy_classifier', True, keeps('proxy classifier cache', True))]
  tokens = [(config.tokenize.out_dir or 'tokens', True, keeps('token cache', True))]
  tokenizer = [(train_tokenizer.SUBDIR, True, keeps('tokenizer training', True))]
  samples, evaluated = ('samples', True, writes('samples')), ('eval', True, writes('evaluation'))
  return {
      'train': run, 'distill': run, 'train_tokenizer': tokenizer, 'tokenize': tokens,
      'sample': [samples],
      'edit': [('edit', True, keeps('edits', True))],
      'eval': [evaluated] + (proxy if 'proxy' in str(config.eval.metrics) else []),
      'reconstruct': [(name, False, keeps(name, False)) for name in ('tokens.npz', 'reconstruction.png',
                                                                      'summary.json')],
      'all': [(all_stages.STAGES_FILE, False, keeps('record of the stages\' inputs', False)),
              ('summary.json', False, keeps('summary', False))] + tokenizer + tokens + run + [samples, evaluated] +
             proxy,
      'study': [(INPUTS_FILE, False, keeps('record of the units\' inputs', False))] + tokenizer + proxy +
               [(name, True, keeps(name, True)) for name in ('tokens', 'models', 'arms', 'cost')],
  }[mode if mode != 'ablation' else 'study']


def workdir_creatable(workdir: str, flag: str = '--workdir') -> None:
  """A local workdir is a folder or can be made one: not an existing file, nor under one (its nearest
  existing ancestor a file). The line is the one the run's makedirs would end in (os.makedirs' error),
  found here before anything is spent, so a dry run and the real run say the same. A bucket has no
  folders to make: not walked (no network)."""
  if files.is_remote(workdir):
    return
  if files.exists(workdir):
    if not files.isdir(workdir):
      raise ConfigError(f'{flag}={workdir!r} cannot be created: {os.strerror(errno.EEXIST)} (a file, not a folder)')
    return
  ancestor = files.absolute(workdir)
  while not files.exists(ancestor) and files.dirname(ancestor) != ancestor:
    ancestor = files.dirname(ancestor)
  if files.exists(ancestor) and not files.isdir(ancestor):
    raise ConfigError(f'{flag}={workdir!r} cannot be created: {os.strerror(errno.ENOTDIR)} ({ancestor!r} is a '
                      'file, not a folder)')


def workdir_layout(mode: str, config, workdir: str) -> None:
  """No file where the run keeps a folder, nor the reverse: found here, not by Orbax, a writer or a
  stage after minutes of work. A bucket has no folders (an object and a prefix of the same name live
  side by side): checked for local workdirs only."""
  workdir_creatable(workdir)
  if files.is_remote(workdir) or not files.isdir(workdir):
    return
  for name, want_dir, what in _layout(mode, config):
    path = files.join(workdir, name)
    if files.exists(path) and files.isdir(path) != want_dir:
      raise ConfigError(f'{path} is a {"file" if want_dir else "folder"} where this run {what}; move it away')


def validate(config, mode: str, workdir: str | None = None) -> None:
  """Every check of `mode` on a resolved config (`with_defaults`), and of the workdir when given;
  ConfigError names the key, file or path."""
  backend()
  CHECKS[mode](config)
  if workdir is not None:
    workdir_layout(mode, config, workdir)
