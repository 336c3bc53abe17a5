"""The command of scaling studies: `python -m srdd_jax.scaling plan|run|fit|prepare` (its flags; the
runner, what each subcommand does, is srdd_jax/modes/scaling.py).

  python -m srdd_jax.scaling plan --config=configs/fashion_mnist.py --workdir=ROOT --depths=2,3,4,6
  python -m srdd_jax.scaling run  --config=configs/fashion_mnist.py --workdir=ROOT --depths=2,3,4,6
  python -m srdd_jax.scaling fit  --workdir=ROOT
  python -m srdd_jax.scaling prepare --config=... --workdir=ROOT --depths=...   # the shared stages only
"""
from __future__ import annotations

import sys

if __name__ == '__main__':
  # A stop while the libraries below load (seconds): status 75 and one line (srdd_jax/parallel/early_stop.py).
  from srdd_jax.parallel import early_stop  # pylint: disable=ungrouped-imports
  early_stop.install()

import json  # pylint: disable=wrong-import-position
import os  # pylint: disable=wrong-import-position

from absl import app
from absl import flags
from ml_collections import config_flags

from srdd_jax import files
from srdd_jax.config import ConfigError, ints, with_defaults
from srdd_jax.modes import checks, scaling
from srdd_jax.parallel import compile_cache, multihost, preemption
from srdd_jax.parallel.workdir import WorkdirLock, write_json


def define_flags():
  """The command's flags, defined when it runs (`python -m srdd_jax.scaling`), not on import: srdd_jax.main
  defines some of the same names, and a process may import both (the tests do)."""
  # pylint: disable=global-statement
  global _CONFIG, _WORKDIR, _DEPTHS, _WIDTH_PER_DEPTH, _MASKS, _STEPS, _EXAMPLES, _HELDOUT, _HELDOUT_SPLIT
  global _TOPOLOGY, _MESH, _MEMORY, _PYTHON, _DRY_RUN, _MULTIHOST
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Base config (configs/<x>.py[:arg]); plan and run.')
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Root of the study: plan.json, shared stages, points/<name>/.')
  _DEPTHS = flags.DEFINE_string('depths', '', 'Transformer depths, comma-separated (width and heads by VAR\'s rule).')
  _WIDTH_PER_DEPTH = flags.DEFINE_integer('width_per_depth', 64, 'Width = this x depth (VAR: 64); heads = depth.')
  _MASKS = flags.DEFINE_string('masks', 'markov,causal', 'Masks, comma-separated.')
  _STEPS = flags.DEFINE_string('steps', '', 'Training steps, comma-separated ("" = config.train.steps).')
  _EXAMPLES = flags.DEFINE_string('examples', '', 'Training-set sizes (first N of the split), comma-separated '
                                  '("" = the whole split).')
  _HELDOUT = flags.DEFINE_integer('heldout_examples', 2000, 'Held-out examples of the held-out loss (0 = all).')
  _HELDOUT_SPLIT = flags.DEFINE_string('heldout_split', 'test', 'The split of the held-out token cache.')
  _TOPOLOGY = flags.DEFINE_string('topology', '', 'plan: compile each train step for this TPU topology '
                                  '(v5p:2x2x2 ...) instead of this host\'s devices.')
  _MESH = flags.DEFINE_string('mesh', '', 'plan with --topology: data,fsdp,tensor (default: every chip on data).')
  _MEMORY = flags.DEFINE_bool('memory', True, 'plan: compile each point\'s train step for its per-chip memory.')
  _PYTHON = flags.DEFINE_string('python', 'python', 'The interpreter in the launch commands.')
  _DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Check the flags and the config, print the plan (nothing compiled) '
                               'and exit; writes and runs nothing.')
  _MULTIHOST = flags.DEFINE_bool('multihost', False, 'prepare / run: start jax.distributed (as srdd_jax.main).')


def cli_config_overrides(argv) -> list[str]:
  """The --config.* arguments of the command line, passed on to every point's command."""
  out, args = [], list(argv)
  for i, a in enumerate(args):
    if a.startswith('--config.'):
      out.append(a if '=' in a else f'{a}={args[i + 1]}' if i + 1 < len(args) else a)
  return out


def _points_from_flags(config) -> list[scaling.Point]:
  steps = ints(_STEPS.value, '--steps')
  if not steps and int(config.train.steps) < 1:
    raise ConfigError('--steps is not given and config.train.steps is 0: give --steps')
  return scaling.sweep(ints(_DEPTHS.value, '--depths'),
                       tuple(m.strip() for m in _MASKS.value.split(',') if m.strip()),
                       steps or (int(config.train.steps),), ints(_EXAMPLES.value, '--examples') or (0,),
                       _WIDTH_PER_DEPTH.value)


USAGE = 'python -m srdd_jax.scaling plan|run|fit|prepare --workdir=ROOT [--config=...]'


def _config():
  """The --config flag's config with its overrides; the file or an override that cannot be read is a
  ConfigError naming it (ml_collections reports them only when the config is first read)."""
  try:
    config = _CONFIG.value
    if config is not None:
      config.keys()
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(checks.diagnose(sys.argv, e)) from None
  return config


def main(argv):
  # SIGTERM or Ctrl-C outside a training loop unwinds the command (the lock released) to status 75, as in
  # srdd_jax.main; a point's training stops after its step and saves, then ends the command alike.
  preemption.stop_on_signals()
  try:
    _main(argv)
  except ConfigError as e:
    sys.exit(_fail(str(e)))
  except (preemption.Interrupted, KeyboardInterrupt) as e:
    status, line = preemption.exit_of(e)
    print(line, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
      stream.flush()
    os._exit(status)  # pylint: disable=protected-access  # As srdd_jax.main: no teardown of saving threads.


def _fail(message: str) -> int:
  print(f'error: {message}', file=sys.stderr)
  return 2


def _main(argv):
  if len(argv) != 2 or argv[1] not in ('plan', 'run', 'fit', 'prepare'):
    given = ' '.join(argv[1:]) or 'none'
    raise ConfigError(f'subcommand {given!r}: give one of plan, run, fit, prepare ({USAGE})')
  cmd, root = argv[1], _WORKDIR.value
  if not root:
    raise ConfigError(f'--workdir is required ({USAGE})')
  # ROOT a folder or one that can be made, before anything (the dry run too): as srdd_jax.main's workdir.
  checks.workdir_creatable(root)
  if cmd == 'fit' and _DRY_RUN.value:
    print(f'fit --workdir={root}: would read {files.join(root, "plan.json")} and the points\' metrics.jsonl')
    return
  if cmd == 'fit':
    scaling.load_plan(root)  # A root without a plan is refused before it is locked (and so created).
    with _held(root):
      out = scaling.fit(root)
    print(scaling.fit_markdown(out))
    print(json.dumps(out['outputs']))
    return
  config = _config()
  if config is None:
    raise ConfigError(f'{cmd} needs --config=configs/<x>.py')
  config = with_defaults(config)
  points = _points_from_flags(config)
  spec = next((a.split('=', 1)[1] for a in sys.argv if a.startswith('--config=')), '')
  overrides = cli_config_overrides(sys.argv[1:])
  mesh = ints(_MESH.value, '--mesh') or None
  # One validation for the dry run and the real run: every flag, the base config and every point's run.
  scaling.check(config, root, points, heldout_examples=_HELDOUT.value, heldout_split=_HELDOUT_SPLIT.value,
                topology=_TOPOLOGY.value if cmd == 'plan' else '', mesh_shape=mesh if cmd == 'plan' else None)
  if _DRY_RUN.value:
    print(scaling.plan_table(scaling.plan(config, spec, overrides, root, points, heldout_examples=_HELDOUT.value,
                                          memory=False, python=_PYTHON.value,
                                          heldout_split=_HELDOUT_SPLIT.value)))
    print(f'{cmd}: dry run, nothing written or run')
    return
  # One cache for the study (ROOT/jax_cache): the points share the sampler, held-out and stage programs.
  compile_cache.setup(root, config.get('compile_cache', ''))
  try:
    _run(cmd, config, root, points, spec, overrides, mesh)
  finally:
    compile_cache.log()


def _held(root: str, enabled: bool = True) -> WorkdirLock:
  """The lock of ROOT (parallel/workdir.py), as srdd_jax.main holds its workdir's: two sweeps writing one
  root trained the same points at once (issue 47: 61 metric lines for 30 steps, both exit 0)."""
  try:
    files.makedirs(root)
  except OSError as e:  # What the check cannot see: a folder it may not write (PermissionError), a full disk.
    raise ConfigError(f'--workdir={root!r} cannot be created: {e.strerror}') from None
  lock = WorkdirLock(root, enabled=enabled)
  preemption.at_forced_exit(lock.release)  # A stop the main thread cannot act on in time.
  return lock


def _run(cmd, config, root, points, spec, overrides, mesh):
  if cmd == 'plan':
    with _held(root):
      p = scaling.plan(config, spec, overrides, root, points, heldout_examples=_HELDOUT.value,
                       topology=_TOPOLOGY.value, mesh_shape=mesh, memory=_MEMORY.value, python=_PYTHON.value,
                       heldout_split=_HELDOUT_SPLIT.value)
      write_json(files.join(root, 'plan.json'), p)
    print(scaling.plan_table(p))
    print(f'written: {files.join(root, "plan.json")}')
    return
  # jax.distributed's notifier owns SIGTERM once it has started (parallel/preemption.py).
  preemption.default_sigterm()
  several = multihost.initialize(None, None, None, auto=_MULTIHOST.value)
  preemption.stop_on_signals(sigterm=not several)
  with _held(root, enabled=multihost.is_main_process()):
    _run_points(cmd, config, root, points, spec, overrides)


def _run_points(cmd, config, root, points, spec, overrides):
  if cmd == 'prepare':
    scaling.run_points(config, root, points, heldout_examples=_HELDOUT.value, prepare_only=True,
                       heldout_split=_HELDOUT_SPLIT.value)
    return
  fresh = scaling.plan(config, spec, overrides, root, points, heldout_examples=_HELDOUT.value, memory=False,
                       python=_PYTHON.value, heldout_split=_HELDOUT_SPLIT.value)
  path = files.join(root, 'plan.json')
  old = files.read_json(path) if files.isfile(path) else None
  # A plan of these very points (perhaps with its compiled memory) is kept; another is replaced.
  stale = old is None or [r['command'] for r in old.get('points', [])] != [r['command'] for r in fresh['points']]
  if stale and multihost.is_main_process():
    write_json(path, fresh)
  done = scaling.run_points(config, root, points, heldout_examples=_HELDOUT.value,
                            heldout_split=_HELDOUT_SPLIT.value)
  print(json.dumps({'points': done}, indent=1))


def _parse_flags(argv):
  """absl's parse of the command line, with a bad flag, value, --config file or override one `error:` line
  and exit status 2 (absl printed its FATAL usage text and exited 1)."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    sys.exit(_fail(checks.diagnose(argv, e)))


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=_parse_flags)
