"""Entry point: python -m srdd_jax.main --config=configs/<x>.py --workdir=DIR --mode=<mode>.

Modes: `train_tokenizer` (the VQ-VAE, configs/tokenizer_smoke.py), `tokenize` (a token cache of a data
set), `train` (the transformer), `distill` (a student on fewer scales, from a trained teacher), `sample`,
`edit` and `eval` (from trained or converted checkpoints, configs/sample.py), `reconstruct` (tokenizer round trip with PSNR), `all` (every stage of an embedded
config in order: configs/fashion_mnist.py), `ablation` (VAR against SDD and SRDD's tools, every variant
trained and evaluated alike, resumable: configs/ablation.py). Several processes: --multihost, or --coordinator_address,
--num_processes, --process_id (launch/README.md).

Exit status: 0 done; 2 an input that cannot work (a config key, path or value: one line on stderr says
which and what would work, nothing was written or lost); 75 stopped by SIGTERM or Ctrl-C after saving
a checkpoint (run the same command again to resume); anything else is a bug.
"""
import difflib
import json
import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from srdd_jax.config import ConfigError, load_file, with_defaults
from srdd_jax.modes import ablation
from srdd_jax.modes import all as all_stages
from srdd_jax.modes import distill
from srdd_jax.modes import edit
from srdd_jax.modes import eval as evaluation
from srdd_jax.modes import reconstruct, sample, tokenize, train, train_tokenizer
from srdd_jax.parallel import multihost
from srdd_jax.parallel.workdir import WorkdirLock
from srdd_jax.train.driver import PREEMPTED_EXIT_CODE

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/<x>.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for outputs, checkpoints and logs.')
_MODE = flags.DEFINE_enum('mode', 'reconstruct', ['reconstruct', 'train', 'distill', 'sample', 'edit',
                                                   'tokenize', 'train_tokenizer', 'eval', 'all', 'ablation'],
                            'What to run.')
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Start jax.distributed with the cluster detected by '
                                'JAX (TPU pods, SLURM, Open MPI).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a manual '
                                   'multi-process start (or $SRDD_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes of a manual multi-process start '
                                      '(or $SRDD_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1 (or '
                                   '$SRDD_PROCESS_ID).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'sample / edit / eval: replace the outputs an earlier run '
                                'left in the workdir (without it they are never replaced).')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Check the command line and the config (every key known, '
                              'the defaults filled in), print the resolved config and exit; runs nothing.')
flags.mark_flags_as_required(['config', 'workdir'])

# --mode -> its runner: run(config, workdir) -> summary dict.
MODES = {
    'reconstruct': reconstruct.run,
    'all': all_stages.run,
    'ablation': ablation.run,
    'train': train.run,
    'distill': distill.run,
    'tokenize': tokenize.run,
    'train_tokenizer': train_tokenizer.run,
    'sample': sample.run,
    'edit': edit.run,
    'eval': evaluation.run,
}
# Modes whose outputs an earlier run may have left: they refuse to replace them unless --overwrite.
_OVERWRITABLE = ('sample', 'edit', 'eval')


def _error(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _diagnose(argv, e: Exception) -> str:
  """A one-line account of why the command line cannot be parsed, naming the flag or config key."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is not None:
    path = spec.partition(':')[0]
    if not os.path.isfile(path):
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
  return f'{first.strip(chr(39))} (command line: {" ".join(argv[1:])})'


def _parse_flags(argv):
  """absl's flag parsing, with a bad --config file or override an exit-2 message, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    _error(_diagnose(argv, e))


class _QuietLibraries(std_logging.Filter):
  """Orbax logs every step of every save at INFO; our progress lines would drown in it."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  workdir, mode = _WORKDIR.value, _MODE.value
  try:  # ml_collections reports a config file it could not load only when the config is first used.
    config = _CONFIG.value
    config.keys()
  except Exception as e:  # pylint: disable=broad-except
    _error(_diagnose(sys.argv, e))
  if _DRY_RUN.value:
    try:
      resolved = with_defaults(config)
    except ConfigError as e:
      _error(str(e))
    print(f'--mode={mode} --workdir={workdir}\n{resolved}')
    return
  try:
    multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_MULTIHOST.value)
  except ValueError as e:
    _error(str(e))
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    _error(f'--workdir={workdir!r} cannot be created: {e.strerror}')
  kwargs = {'overwrite': _OVERWRITE.value} if mode in _OVERWRITABLE else {}
  try:
    with WorkdirLock(workdir, enabled=multihost.is_main_process()):
      summary = MODES[mode](config, workdir, **kwargs)
  except ConfigError as e:
    _error(str(e))
  except PermissionError as e:  # A read-only workdir (or a file in it), found when first written.
    _error(f'cannot write {e.filename!r} ({e.strerror}): give a writable --workdir')
  if multihost.is_main_process():
    print(json.dumps(summary, indent=1, default=str))
  if summary.get('stopped_by') and not summary.get('complete', True):
    logging.warning('stopped by %s at step %s; run the same command again to resume',
                    summary['stopped_by'], summary.get('end_step'))
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
