"""Scaling studies: plan, run and fit a sweep of transformers over size, training steps, data and mask.

The runner of the command `python -m srdd_jax.scaling` (srdd_jax/scaling.py: its flags):

  python -m srdd_jax.scaling plan --config=configs/fashion_mnist.py --workdir=ROOT --depths=2,3,4,6
  python -m srdd_jax.scaling run  --config=configs/fashion_mnist.py --workdir=ROOT --depths=2,3,4,6
  python -m srdd_jax.scaling fit  --workdir=ROOT
  python -m srdd_jax.scaling prepare --config=... --workdir=ROOT --depths=...   # the shared stages only

A point is (depth, mask, steps, examples). Its width and heads follow VAR's rule, width = 64 x depth
(--width_per_depth; smaller for CPU studies) and heads = depth; every other setting is the base
config's (with its --config.* overrides). Axes: --depths, --masks (default markov,causal), --steps
(default config.train.steps) and --examples (training-set sizes, the first N of the split; default all).

plan   prints and writes ROOT/plan.json: per point the analytic training FLOPs (per token and per run,
       srdd_jax/transformer/flops.py), the parameter count, the per-chip memory of the compiled train step
       (on this host's devices, or with --topology=v5p:2x2x2 for that TPU slice compiled here, libtpu
       needed) and the launch command (`python -m srdd_jax.main ... --mode=train`); launch/launch.py
       starts every point of a plan on a pod, a SLURM cluster or this machine.
run    runs the points here one after the other: the shared stages first (the tokenizer, unless
       config.tokenizer.checkpoint names one; the token caches of the training split, one per size, and
       of the held-out split), then each point's training with its held-out token loss in metrics.jsonl
       (config.train.heldout_cache). Interrupted, it resumes: finished points are kept (their
       ROOT/points/<name>/done.json), a point cut short resumes from its checkpoint. `prepare` runs the
       shared stages alone: what a launcher runs before the points' jobs (plan.json's prepare_command).
fit    reads every point's metrics.jsonl (the held-out loss at its last step), fits
       L(C) = a * (C / C0)^(-b) + c per mask (C the analytic training FLOPs of the run, C0 their geometric
       mean, least squares with the covariance's standard errors) and writes ROOT/scaling.json,
       scaling.md and scaling.png (loss against compute, both masks, the fitted curves).
"""
from __future__ import annotations

import dataclasses
import json
import math
import shlex
import time

import jax
import numpy as np
from absl import logging
from scipy.optimize import curve_fit

from srdd_jax import files
from srdd_jax.config import ConfigError, with_defaults
from srdd_jax.convert import params_io
from srdd_jax.data import pipeline
from srdd_jax.evaluation.plot import Chart
from srdd_jax.modes import checks, tokenize, train, train_tokenizer
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import multihost, preemption
from srdd_jax.parallel.compile import aot_record, aot_train_step, rules_for, topology_devices
from srdd_jax.parallel.workdir import Units, WorkdirLock, file_identity, write_json
from srdd_jax.tokenizer.api import Tokenizer, tokenizer_config, unbox
from srdd_jax.train.optimizer import OptimConfig
from srdd_jax.train.step import Trainer
from srdd_jax.transformer import flops
from srdd_jax.transformer.config import var_config

FORMAT = 'srdd_jax.scaling/1'
MASKS = ('markov', 'causal')


# --- the sweep ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Point:
  depth: int
  width: int
  heads: int
  mask: str
  steps: int
  examples: int  # 0 = the whole training split.

  @property
  def name(self) -> str:
    return f'd{self.depth}_w{self.width}_{self.mask}_s{self.steps}_n{self.examples or "all"}'


def sweep(depths, masks, steps, examples, width_per_depth: int = 64) -> list[Point]:
  """Every combination, in order of depth, then steps, examples and mask. Width = width_per_depth x
  depth, heads = depth (VAR's rule; 64-channel heads at its width_per_depth of 64)."""
  if not depths:
    raise ConfigError('--depths is empty: give the transformer depths of the sweep, e.g. --depths=2,3,4,6')
  if width_per_depth < 1:
    raise ConfigError(f'--width_per_depth={width_per_depth} must be >= 1')
  bad = [m for m in masks if m not in MASKS]
  if bad or not masks:
    raise ConfigError(f'--masks: {bad[0] if bad else "(empty)"!r}; use markov and/or causal')
  for name, values in (('depths', depths), ('steps', steps)):
    if any(v < 1 for v in values):
      raise ConfigError(f'--{name}={",".join(map(str, values))}: every value must be >= 1')
  if any(v < 0 for v in examples):
    raise ConfigError(f'--examples={",".join(map(str, examples))}: sizes must be >= 1 (0 = all)')
  out = []
  for d in depths:
    width, heads = width_per_depth * d, d
    for s in steps:
      for n in examples:
        for m in masks:
          out.append(Point(d, width, heads, m, s, n))
  return out


def _dedupe(values):
  return tuple(dict.fromkeys(values))


def point_overrides(p: Point) -> dict:
  """The config keys a point sets on top of the base config."""
  return {'model.preset': '', 'model.depth': p.depth, 'model.width': p.width, 'model.heads': p.heads,
          'model.mask': p.mask, 'train.steps': p.steps, 'train.epochs': 0.0}


def apply_overrides(config, overrides: dict):
  c = with_defaults(config)
  for key, value in overrides.items():
    section, field = key.split('.')
    c[section][field] = value
  return c


def shared_paths(config, root: str, examples) -> dict:
  """Where the shared stages put (or found) the tokenizer and the token caches."""
  tok = config.tokenizer.checkpoint or files.join(root, 'tokenizer', 'params')
  given_cache = config.data.token_cache
  caches = {n: (given_cache if given_cache and not n else files.join(root, 'tokens', f'train_{n or "all"}'))
            for n in examples}
  return {'tokenizer': tok, 'tokenizer_given': bool(config.tokenizer.checkpoint), 'train_caches': caches,
          'heldout_cache': files.join(root, 'tokens', 'heldout')}


def point_config(config, root: str, p: Point, paths: dict, heldout_examples: int):
  c = apply_overrides(config, point_overrides(p))
  c.tokenizer.checkpoint = paths['tokenizer']
  c.data.token_cache = paths['train_caches'][p.examples]
  c.train.heldout_cache = paths['heldout_cache']
  c.train.heldout_examples = heldout_examples
  return c


def launch_command(python: str, config_spec: str, cli_overrides, root: str, p: Point, paths: dict,
                   heldout_examples: int) -> list[str]:
  """argv of `python -m srdd_jax.main` that trains point `p` (what `run` does in-process)."""
  keys = {**point_overrides(p), 'tokenizer.checkpoint': paths['tokenizer'],
          'data.token_cache': paths['train_caches'][p.examples], 'train.heldout_cache': paths['heldout_cache'],
          'train.heldout_examples': heldout_examples}
  return ([python, '-m', 'srdd_jax.main', f'--config={config_spec}', f'--workdir={files.join(root, "points", p.name)}',
           '--mode=train', *cli_overrides] + [f'--config.{k}={v}' for k, v in keys.items()])


def check(config, root: str, points, *, heldout_examples: int, heldout_split: str, topology: str = '',
          mesh_shape=None):
  """Every flag and config value of plan / run / prepare, before anything is compiled, written or run (the
  dry run runs this and stops): the sweep's own flags, the base config's data and tokenizer training (when
  the study trains its tokenizer), and the launched training run of every point (its config values, its
  architecture and, on this host, its mesh)."""
  if topology:
    pm.check_topology_name(topology, '--topology')
  if mesh_shape and len(mesh_shape) != len(pm.MESH_AXES):
    raise ConfigError(f'--mesh={",".join(map(str, mesh_shape))}: {len(pm.MESH_AXES)} sizes, '
                      f'{",".join(pm.MESH_AXES)}')
  if heldout_examples < 0:
    raise ConfigError(f'--heldout_examples={heldout_examples}: must be >= 0 (0 = all)')
  if not heldout_split:
    raise ConfigError('--heldout_split is empty: give the split of the held-out token cache (e.g. test)')
  checks.backend()
  if config.data.token_cache:  # A cache the config gives is used as it is.
    checks.token_cache_present(config.data.token_cache, 'config.data.token_cache')
  pipeline.check(config.data)
  if not config.tokenizer.checkpoint:
    checks.tokenizer_training(config)
  if mesh_shape:
    config = apply_overrides(config, {f'mesh.{k}': int(v) for k, v in zip(pm.MESH_AXES, mesh_shape)})
  paths = shared_paths(config, root, _dedupe(p.examples for p in points))
  for p in points:
    checks.transformer_values(point_config(config, root, p, paths, heldout_examples), mesh=not topology)


# --- plan --------------------------------------------------------------------------------------------

def analytic(var_config, batch: int, steps: int) -> dict:
  f = flops.forward_flops(var_config)
  per_step = flops.train_step_flops(var_config, batch)
  return {'params': int(flops.num_params(var_config)), 'train_flops_per_token': 3.0 * f['total'] / var_config.seq_len,
          'train_flops_per_step': per_step, 'train_flops': per_step * steps,
          'tokens': int(batch * var_config.seq_len * steps)}


def _var_config(c):
  tok = c.tokenizer.checkpoint
  vq = params_io.load_vqvae(tok)[0] if tok and files.isdir(tok) else tokenizer_config(c)
  vq = dataclasses.replace(vq, patch_nums=tuple(c.model.patch_nums))
  return var_config(c, vq.vocab_size, vq.z_channels), vq


def compiled_memory(c, topology: str = '') -> dict:
  """Per-chip bytes and XLA's FLOPs of the point's train step, compiled from abstract state (nothing is
  allocated) on the point's own mesh (config.mesh, as the launched run builds it): on this host's
  devices, or for a TPU topology (AOT, libtpu)."""
  vc, vq = _var_config(c)
  batch = int(c.train.global_batch)
  devices = topology_devices(topology, '--topology') if topology else jax.devices()
  rules = 'fsdp' if pm.rules_from_config(c) == pm.DEFAULT_RULES else None
  mesh = pm.mesh_from_config(c, devices if topology else None)  # A mesh that cannot be: ConfigError, exit 2.
  try:
    # With the point's EMA, whose copy of the weights is part of what each chip holds.
    trainer = Trainer(vc, vq, OptimConfig(peak_lr=1e-4, total_steps=1000), mesh, rules=rules_for(rules or 'fsdp'),
                      ema_decay=float(c.train.ema_decay))
    compiled, compile_s = aot_train_step(trainer, unbox(Tokenizer(vq).abstract_params()), batch)
    rec = aot_record(compiled, compile_s, topology or 'local', devices, mesh)
  except Exception as e:  # pylint: disable=broad-except
    return {'error': f'{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}'}
  return {k: rec.get(k) for k in ('per_chip_bytes', 'xla_flops', 'chips', 'device_kind', 'mesh', 'hbm_bytes',
                                  'fits', 'compile_s')}


def plan(config, config_spec: str, cli_overrides, root: str, points, *, heldout_examples: int,
         topology: str = '', mesh_shape=None, memory: bool = True, python: str = 'python',
         heldout_split: str = 'test') -> dict:
  if mesh_shape:
    # The plan prices the mesh its launched points will use: the override reaches both.
    mesh = dict(zip(pm.MESH_AXES, (int(v) for v in mesh_shape)))
    config = apply_overrides(config, {f'mesh.{k}': v for k, v in mesh.items()})
    cli_overrides = [*cli_overrides, *(f'--config.mesh.{k}={v}' for k, v in mesh.items())]
  paths = shared_paths(config, root, _dedupe(p.examples for p in points))
  rows = []
  for i, p in enumerate(points):
    c = point_config(config, root, p, paths, heldout_examples)
    vc, _ = _var_config(c)
    row = {'name': p.name, **dataclasses.asdict(p), 'batch': int(c.train.global_batch),
           'seq_len': vc.seq_len, **analytic(vc, int(c.train.global_batch), p.steps),
           'workdir': files.join(root, 'points', p.name),
           'command': launch_command(python, config_spec, cli_overrides, root, p, paths, heldout_examples)}
    if memory:
      logging.info('plan: compiling the train step of %s (%d/%d)%s', p.name, i + 1, len(points),
                   f' for {topology}' if topology else '')
      row['memory'] = compiled_memory(c, topology)
    rows.append(row)
  prepare = [python, '-m', 'srdd_jax.scaling', 'prepare', f'--config={config_spec}', f'--workdir={root}',
             *sweep_flags(points), f'--heldout_examples={heldout_examples}', f'--heldout_split={heldout_split}',
             *cli_overrides]
  return {'format': FORMAT, 'config': config_spec, 'overrides': list(cli_overrides), 'workdir': root,
          'shared': paths, 'heldout_examples': heldout_examples, 'topology': topology or 'local',
          'prepare_command': prepare, 'points': rows}


def sweep_flags(points) -> list[str]:
  """Flags that give back the examples sizes of `points` (what `prepare` needs; depths for the check)."""
  j = lambda xs: ','.join(str(x) for x in _dedupe(xs))
  return [f'--depths={j(p.depth for p in points)}', f'--masks={j(p.mask for p in points)}',
          f'--steps={j(p.steps for p in points)}', f'--examples={j(p.examples for p in points)}',
          f'--width_per_depth={points[0].width // points[0].depth}']


def plan_table(p: dict) -> str:
  lines = [f'Scaling plan ({len(p["points"])} points; memory: {p["topology"]}); root {p["workdir"]}', '',
           '| point | params | steps | batch | FLOPs/token | FLOPs/run | per-chip memory GiB | launch |',
           '|---|---|---|---|---|---|---|---|']
  for r in p['points']:
    mem = r.get('memory') or {}
    m = ('n/a' if not mem else mem.get('error', '')[:40] if 'error' in mem or mem.get('per_chip_bytes') is None
         else f'{mem["per_chip_bytes"] / 2 ** 30:.2f}')
    lines.append(f'| {r["name"]} | {r["params"] / 1e6:.2f} M | {r["steps"]} | {r["batch"]} | '
                 f'{r["train_flops_per_token"]:.3g} | {r["train_flops"]:.3g} | {m} | '
                 f'`{shlex.join(r["command"])}` |')
  return '\n'.join(lines) + '\n'


def load_plan(root: str) -> dict:
  path = files.join(root, 'plan.json')
  if not files.isfile(path):
    raise ConfigError(f'--workdir={root!r} holds no plan.json: run `python -m srdd_jax.scaling plan` first')
  p = files.read_json(path)
  if p.get('format') != FORMAT:
    raise ConfigError(f'{path}: format {p.get("format")!r}, this version reads {FORMAT}')
  return p


# --- run ---------------------------------------------------------------------------------------------

def run_points(config, root: str, points, *, heldout_examples: int, prepare_only: bool = False,
               heldout_split: str = 'test') -> list[dict]:
  """The shared stages, then (unless prepare_only) every point in order; finished ones are kept.

  Each unit records what it was made from in ROOT/inputs.json, as --mode=all's stages and the study's units
  do (parallel/workdir.Units): the tokenizer, each token cache and each point hold training work, so one
  made from other inputs (another tokenizer, other settings of the config) is refused with exit status 2
  naming the change, and so are a point's checkpoints cut short. A training stage stopped by SIGTERM or
  Ctrl-C (its checkpoint saved) ends the command as every stop does (preemption.Interrupted: status 75)."""
  paths = shared_paths(config, root, _dedupe(p.examples for p in points))
  base = with_defaults(config)
  t_all = time.time()
  units = Units(root, result='done.json', label='scaling:', inputs_file=INPUTS_FILE)
  data = {k: v for k, v in base.data.to_dict().items() if k != 'token_cache'}

  if not paths['tokenizer_given']:
    inputs = {'config.tokenizer': {k: v for k, v in base.tokenizer.to_dict().items() if k != 'checkpoint'},
              'config.tokenizer_train': base.tokenizer_train.to_dict(), 'config.data': data}

    def tokenizer():
      s = units.timed('tokenizer/checkpoints', lambda: train_tokenizer.run(base, root), inputs=inputs,
                      where=files.join(root, train_tokenizer.SUBDIR, 'checkpoints'))
      if not s.get('export'):
        raise preemption.Interrupted(s.get('stopped_by') or 'a request',
                                     f'the tokenizer at step {s.get("end_step")}, its checkpoint saved')
      return s
    units('tokenizer', tokenizer, output=paths['tokenizer'], inputs=inputs, redo=False)
  base.tokenizer.checkpoint = paths['tokenizer']
  tokenizer_identity = params_io.model_identity(paths['tokenizer'])

  def cache(out_dir, split, max_examples):
    def fn():
      c = with_defaults(base)
      c.tokenize.update(out_dir=out_dir, split=split, max_examples=max_examples)
      logging.info('scaling: token cache %s (%s split, %s examples)', out_dir, split, max_examples or 'all')
      return tokenize.run(c, root)
    tk = {k: v for k, v in base.tokenize.to_dict().items() if k not in ('out_dir', 'split', 'max_examples')}
    inputs = {'tokenizer': tokenizer_identity, 'split': split, 'max_examples': max_examples,
              'patch_nums': list(base.model.patch_nums), 'config.data': data, 'config.tokenize': tk}
    units(f'token cache {files.basename(out_dir)}', fn, output=files.join(out_dir, 'manifest.json'), inputs=inputs,
          redo=False)
  for n, d in paths['train_caches'].items():
    if d != base.data.token_cache:  # A cache the config gives is used as it is.
      cache(d, 'train', n)
  cache(paths['heldout_cache'], heldout_split, heldout_examples)
  if prepare_only:
    return []
  out = []
  for i, p in enumerate(points):
    wd = files.join(root, 'points', p.name)
    c = point_config(base, root, p, paths, heldout_examples)
    inputs = point_inputs(c, p, tokenizer_identity)

    def point(p=p, wd=wd, c=c, inputs=inputs):
      def train_point():
        # The point's own workdir is held too: a launched run of the same point (launch/) cannot train
        # it at the same time.
        with WorkdirLock(wd, enabled=multihost.is_main_process()) as lock:
          preemption.at_forced_exit(lock.release)
          return train.run(c, wd)
      files.makedirs(wd)
      s = units.timed(f'points/{p.name}/checkpoints', train_point, inputs=inputs,
                      where=files.join(wd, 'checkpoints'))
      if not s.get('export'):
        raise preemption.Interrupted(s.get('stopped_by') or 'a request',
                                     f'point {p.name} at step {s.get("end_step")}, its checkpoint saved')
      return {'name': p.name, 'export': s['export']}
    logging.info('scaling: point %s (%d/%d)%s', p.name, i + 1, len(points),
                 f', {time.time() - t_all:.0f}s so far' if i else '')
    # Finished points (their ROOT/points/<name>/done.json) are kept; one cut short resumes from its checkpoint.
    out.append(units(f'points/{p.name}', point, inputs=inputs, redo=False))
  return out


INPUTS_FILE = 'inputs.json'  # ROOT/inputs.json: what each unit of `run_points` was made from.
# config.train keys that say how a run is logged and saved, not what it trains.
_BOOKKEEPING = ('log_every', 'checkpoint_every', 'keep_checkpoints', 'sample_every')


def point_inputs(c, p: Point, tokenizer: dict) -> dict:
  """What point `p` (its config `c`, point_config's) is trained from: the point, the tokenizer
  (params_io.model_identity), its training and held-out token caches (their manifests: path, size and
  time), and every config setting that changes what it learns or how its loss is measured."""
  t = c.train.to_dict()
  return {'point': dataclasses.asdict(p), 'seed': int(c.seed), 'tokenizer': tokenizer,
          'token_cache': file_identity(files.join(c.data.token_cache, 'manifest.json')),
          'heldout_cache': file_identity(files.join(c.train.heldout_cache, 'manifest.json')),
          'config.model': {k: v for k, v in c.model.to_dict().items() if k != 'checkpoint'},
          'config.train': {k: v for k, v in t.items() if k not in _BOOKKEEPING + ('heldout_cache',)},
          'config.optim': c.optim.to_dict(),
          'config.data': {k: v for k, v in c.data.to_dict().items() if k != 'token_cache'}}


# --- fit ---------------------------------------------------------------------------------------------

def last_heldout(metrics_path: str) -> dict | None:
  """The held-out record of the last step that has one."""
  if not files.isfile(metrics_path):
    return None
  best = None
  with files.open(metrics_path) as f:
    for line in f:
      r = json.loads(line)
      if 'heldout_loss' in r and (best is None or r['step'] >= best['step']):
        best = r
  return best


def power_law(c, a, b, c_inf):
  return a * np.power(c, -b) + c_inf


def fit_power_law(compute, loss) -> dict:
  """L(C) = a (C / C0)^(-b) + c by least squares, C0 the geometric mean of C (conditioning); standard
  errors from the covariance scaled by the residual variance. Needs 4 points (3 parameters + 1)."""
  compute, loss = np.asarray(compute, np.float64), np.asarray(loss, np.float64)
  if len(compute) < 4:
    raise ValueError(f'{len(compute)} points: a 3-parameter power law needs at least 4')
  c0 = float(np.exp(np.mean(np.log(compute))))
  x = compute / c0
  # Start: c below the smallest loss, b from the slope of log(L - c) against log C.
  c_start = float(loss.min()) * 0.9
  slope = np.polyfit(np.log(x), np.log(np.maximum(loss - c_start, 1e-12)), 1)[0]
  p0 = (float(np.exp(np.mean(np.log(np.maximum(loss - c_start, 1e-12))))), max(-slope, 1e-3), c_start)
  params, cov = curve_fit(power_law, x, loss, p0=p0, maxfev=20000)
  err = np.sqrt(np.maximum(np.diag(cov), 0.0)) if np.all(np.isfinite(cov)) else np.full(3, np.nan)
  pred = power_law(x, *params)
  return {'a': float(params[0]), 'a_err': float(err[0]), 'b': float(params[1]), 'b_err': float(err[1]),
          'c': float(params[2]), 'c_err': float(err[2]), 'C0': c0, 'points': int(len(x)),
          'rms_residual': float(np.sqrt(np.mean((pred - loss) ** 2))),
          'form': 'L(C) = a * (C / C0)^(-b) + c'}


def collect(root: str) -> list[dict]:
  p = load_plan(root)
  rows = []
  for r in p['points']:
    h = last_heldout(files.join(r['workdir'], 'metrics.jsonl'))
    if h is None:
      logging.warning('scaling fit: %s has no held-out loss in %s/metrics.jsonl (not run yet?): left out',
                      r['name'], r['workdir'])
      continue
    if h['step'] != r['steps']:
      logging.warning('scaling fit: %s has run %d of %d steps: its loss at step %d is used with that compute',
                      r['name'], h['step'], r['steps'], h['step'])
    rows.append({'name': r['name'], 'mask': r['mask'], 'depth': r['depth'], 'width': r['width'],
                 'params': r['params'], 'steps': h['step'], 'examples': r['examples'],
                 'compute': r['train_flops_per_step'] * h['step'], 'heldout_loss': h['heldout_loss'],
                 'heldout_loss_per_scale': h.get('heldout_loss_per_scale')})
  return rows


def fit(root: str) -> dict:
  rows = collect(root)
  if not rows:
    raise ConfigError(f'--workdir={root!r}: no point has a held-out loss yet (run `python -m srdd_jax.scaling run`)')
  fits = {}
  for mask in MASKS:
    mine = [r for r in rows if r['mask'] == mask]
    if not mine:
      continue
    try:
      fits[mask] = fit_power_law([r['compute'] for r in mine], [r['heldout_loss'] for r in mine])
    except (ValueError, RuntimeError) as e:
      fits[mask] = {'error': str(e), 'points': len(mine)}
  out = {'format': FORMAT, 'workdir': root, 'runs': rows, 'fits': fits,
         'outputs': {k: files.join(root, f'scaling.{k}') for k in ('json', 'md', 'png')}}
  write_json(out['outputs']['json'], out)
  files.write_text(out['outputs']['md'], fit_markdown(out))
  plot(rows, fits, out['outputs']['png'])
  return out


def fit_markdown(out: dict) -> str:
  lines = ['| point | mask | params | steps | training FLOPs | held-out loss |', '|---|---|---|---|---|---|']
  for r in sorted(out['runs'], key=lambda r: (r['mask'], r['compute'])):
    lines.append(f'| {r["name"]} | {r["mask"]} | {r["params"] / 1e6:.3f} M | {r["steps"]} | {r["compute"]:.3g} | '
                 f'{r["heldout_loss"]:.4f} |')
  lines += ['', 'Fits of L(C) = a (C / C0)^(-b) + c (least squares, ± standard errors):', '',
            '| mask | points | a | b | c | C0 | rms residual |', '|---|---|---|---|---|---|---|']
  for mask, f in out['fits'].items():
    if 'error' in f:
      lines.append(f'| {mask} | {f["points"]} | not fitted: {f["error"]} | | | | |')
      continue
    lines.append(f'| {mask} | {f["points"]} | {f["a"]:.4g} ± {f["a_err"]:.2g} | {f["b"]:.4g} ± {f["b_err"]:.2g} | '
                 f'{f["c"]:.4g} ± {f["c_err"]:.2g} | {f["C0"]:.3g} | {f["rms_residual"]:.3g} |')
  return '\n'.join(lines) + '\n'


def plot(rows, fits, path: str, size=(720, 480)):
  """Held-out loss against training FLOPs (log x), a colour per mask, with the fitted curves."""
  lx = np.log10([r['compute'] for r in rows])
  ly = np.asarray([r['heldout_loss'] for r in rows])
  x0, x1 = float(lx.min()) - 0.1, float(lx.max()) + 0.1
  y0, y1 = float(ly.min()), float(ly.max())
  pad = 0.1 * (y1 - y0 or 1.0)
  y0, y1 = y0 - pad, y1 + pad
  chart = Chart(size, (x0, x1), (y0, y1), x_title='training FLOPs (analytic, log scale)',
                x_title_at=size[0] // 2 - 90, y_title='held-out token loss; lines: fitted a (C/C0)^-b + c',
                x_tick='1e{:.1f}', y_tick='{:.3f}')
  d, px, py, w, right, top = chart.draw, chart.px, chart.py, size[0], chart.right, chart.top
  colours = {'markov': '#d62728', 'causal': '#1f77b4'}
  for i, mask in enumerate(MASKS):
    col = colours[mask]
    f = fits.get(mask)
    if f and 'error' not in f:
      xs = np.linspace(x0, x1, 100)
      ys = power_law(10 ** xs / f['C0'], f['a'], f['b'], f['c'])
      pts = [(px(x), py(y)) for x, y in zip(xs, ys) if y0 <= y <= y1]
      if len(pts) > 1:
        d.line(pts, fill=col, width=2)
      label = f'{mask}: b = {f["b"]:.3f} ± {f["b_err"]:.2g}'
    else:
      label = f'{mask}: not fitted'
    for r in rows:
      if r['mask'] == mask:
        x, y = px(math.log10(r['compute'])), py(r['heldout_loss'])
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=col)
    d.text((w - right - 260, top + 5 + 15 * i), label, fill=col)
  chart.save(path)
