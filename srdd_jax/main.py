"""Entry point: python -m srdd_jax.main --config=configs/<x>.py --workdir=DIR [--mode=<mode>].

Modes: `train` (the default: the transformer of the config), `train_tokenizer` (the VQ-VAE,
configs/tokenizer_smoke.py), `tokenize` (a token cache of a data set), `distill` (a student on fewer scales,
from a trained teacher), `sample`, `edit` and `eval` (from trained or converted checkpoints,
configs/sample.py), `reconstruct` (tokenizer round trip with PSNR), `all` (every stage of an embedded config
in order: configs/fashion_mnist.py), `study` (VAR against SDD and SRDD's tools, every arm trained and
evaluated alike, resumable: configs/ablation.py; `ablation` is its older name). Several processes:
--multihost, or --coordinator_address, --num_processes, --process_id (launch/README.md).

Every command is checked before anything is spent, by the one function `--dry_run` runs
(modes/checks.validate: every key of the mode, the files it reads, the workdir's layout, the backend), so
a dry run and the real run refuse a bad input with the same line.

Exit status: 0 done; 2 an input that cannot work (a config key, path or value, a full disk, a training
run that diverged: one line on stderr says which and what would work, nothing saved was altered); 75
stopped by SIGTERM or Ctrl-C at any point, a training stage after saving a checkpoint, any other before its
outputs are put in place, the workdir's lock released (run the same command again to continue); 130 a
second Ctrl-C in a training loop (its stop's checkpoint not saved); anything else is a bug. In a Python
process, `run(argv)` does the same and returns the status (`parse` and `execute` are its two halves).
"""
import sys

if __name__ == '__main__':
  # The libraries below take seconds to load (JAX's most): a stop meanwhile ends the command at once, with
  # the status of every stop and one line. main() puts the handler of the run in its place.
  from srdd_jax.parallel import early_stop  # pylint: disable=ungrouped-imports
  early_stop.install()

import dataclasses  # pylint: disable=wrong-import-position
import json  # pylint: disable=wrong-import-position
import logging as std_logging  # pylint: disable=wrong-import-position
import os  # pylint: disable=wrong-import-position
from typing import Any  # pylint: disable=wrong-import-position

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from srdd_jax import files
from srdd_jax.config import ConfigError, with_defaults
from srdd_jax.modes import checks
from srdd_jax.modes import all as all_stages
from srdd_jax.modes import distill
from srdd_jax.modes import edit
from srdd_jax.modes import eval as evaluation
from srdd_jax.modes import reconstruct, sample, study, tokenize, train, train_tokenizer
from srdd_jax.parallel import compile_cache, multihost, preemption
from srdd_jax.parallel.workdir import WorkdirLock, check_store, storage_fault
from srdd_jax.train.driver import PREEMPTED_EXIT_CODE, NonFiniteLoss

# --mode -> its runner: run(config, workdir) -> summary dict.
MODES = {
    'reconstruct': reconstruct.run,
    'all': all_stages.run,
    'study': study.run,
    'ablation': study.run,  # The study's older name.
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
BAD_INPUT_EXIT_CODE = 2


DEFAULT_MODE = 'train'


def define_flags(flag_values: flags.FlagValues, sys_argv: list[str] | None = None) -> dict[str, Any]:
  """The command's flags, defined on `flag_values`: absl's global FLAGS for `python -m srdd_jax.main`, a
  fresh FlagValues for each command line `parse` reads in-process. `sys_argv`: the command line the
  config's overrides (--config.a.b=...) are read from (None: sys.argv, when parsed)."""
  fv = {'flag_values': flag_values}
  holders = {
      'config': config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/<x>.py).',
                                                sys_argv=sys_argv, **fv),
      'workdir': flags.DEFINE_string('workdir', None, 'Directory for outputs, checkpoints and logs.', **fv),
      # `train` by default: the command a user types first, --config and --workdir alone, trains the
      # config's model (it once ran the tokenizer's round trip, `reconstruct`, and trained nothing).
      'mode': flags.DEFINE_enum('mode', DEFAULT_MODE, ['train', 'reconstruct', 'distill', 'sample', 'edit',
                                                     'tokenize', 'train_tokenizer', 'eval', 'all', 'study',
                                                     'ablation'],
                                f'What to run (default {DEFAULT_MODE}: the transformer of the config).', **fv),
      'multihost': flags.DEFINE_bool('multihost', False, 'Start jax.distributed with the cluster detected by '
                                     'JAX (TPU pods, SLURM, Open MPI).', **fv),
      'coordinator_address': flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a '
                                                 'manual multi-process start (or $SRDD_COORDINATOR_ADDRESS).',
                                                 **fv),
      'num_processes': flags.DEFINE_integer('num_processes', None, 'Processes of a manual multi-process start '
                                            '(or $SRDD_NUM_PROCESSES).', **fv),
      'process_id': flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1 (or '
                                         '$SRDD_PROCESS_ID).', **fv),
      'overwrite': flags.DEFINE_bool('overwrite', False, 'sample / edit / eval: replace the outputs an earlier '
                                     'run left in the workdir (without it they are never replaced).', **fv),
      'dry_run': flags.DEFINE_bool('dry_run', False, 'Check the command line and the config (every key known, '
                                   'the defaults filled in, the values the mode checks before it starts), print '
                                   'the resolved config and exit; runs nothing.',
                                   **fv),
  }
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=flag_values)
  return holders


_FLAGS = define_flags(flags.FLAGS)


class BadInput(Exception):
  """An input that cannot work (a flag, config key, path or value): exit status 2 with this one-line
  message on stderr; nothing was run, written or lost."""


@dataclasses.dataclass(frozen=True)
class Command:
  """One parsed command line: the config (its file loaded, the overrides applied) and what to do with it."""
  config: Any
  workdir: str
  mode: str
  multihost: bool = False
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  overwrite: bool = False
  dry_run: bool = False
  mode_given: bool = True  # False: --mode was left out and `mode` is the default.


def _command(holders: dict[str, Any], argv: list[str]) -> Command:
  """The Command of parsed flags; `argv` is the command line they were parsed from."""
  try:  # ml_collections reports a config file it could not load only when the config is first used.
    config = holders['config'].value
    config.keys()
  except Exception as e:  # pylint: disable=broad-except
    raise BadInput(checks.diagnose(argv, e)) from None
  return Command(config=config, mode_given=bool(holders['mode'].present),
                 **{k: h.value for k, h in holders.items() if k != 'config'})


def _unexpected(arguments) -> BadInput:
  return BadInput(f'unexpected argument {arguments[0]!r}: the command takes flags only (--name=value; a value '
                  'with spaces in quotes); nothing was run')


def parse(argv: list[str]) -> Command:
  """A command line (argv[0] the program) -> its Command, read with the flags `python -m srdd_jax.main`
  defines (absl's own, such as --verbosity, are not among them), on a fresh set of flags: one process may
  parse any number of command lines. BadInput names the flag, config file or config key at fault."""
  flag_values = flags.FlagValues()
  holders = define_flags(flag_values, sys_argv=list(argv))
  try:
    rest = flag_values(list(argv))
  except Exception as e:  # pylint: disable=broad-except
    raise BadInput(checks.diagnose(argv, e)) from None
  if len(rest) > 1:
    raise _unexpected(rest[1:])
  return _command(holders, list(argv))


def validated(command: Command):
  """The command's config resolved (`with_defaults`) and checked by modes/checks.validate, the one
  validation of every mode: `--dry_run` runs it and stops, the real run runs it before anything is
  written, so both refuse a bad input with the same line."""
  try:
    resolved = with_defaults(command.config)
    checks.validate(resolved, command.mode, command.workdir)
  except ConfigError as e:
    raise BadInput(str(e)) from None
  return resolved


def execute(command: Command) -> int:
  """Runs a parsed command; returns its exit status: 0 done, 75 (PREEMPTED_EXIT_CODE) stopped by SIGTERM
  or Ctrl-C after saving a checkpoint. BadInput for an input that cannot work, found before anything
  was written."""
  mode, workdir = command.mode, command.workdir
  if command.dry_run:
    # What would run, first, whatever the checks find: a command without --mode trains.
    default = '' if command.mode_given else ' (the default: no --mode was given)'
    print(f'--mode={mode}{default} --workdir={workdir}', flush=True)
    print(validated(command))
    return 0
  try:
    check_store(workdir)
  except ConfigError as e:
    raise BadInput(str(e)) from None
  # The process's own stop handler (main() installed it; a process that calls `run` keeps its own): its
  # SIGTERM part gives way while jax.distributed starts, whose notifier's handler is then kept for the
  # training runs (preemption.sigterm_to_jax) and Python's put back for everything else.
  own_stops = preemption.stopping_handled()
  if own_stops:
    preemption.default_sigterm()
  try:
    several = multihost.initialize(command.coordinator_address, command.num_processes, command.process_id,
                                   auto=command.multihost)
  except ValueError as e:
    raise BadInput(str(e)) from None
  if own_stops:
    if several:  # Its notifier's handler, kept for the training runs (preemption.sigterm_to_jax).
      preemption.keep_jax_sigterm()
    preemption.stop_on_signals(sigterm=not several or preemption.jax_sigterm_kept())
  # After jax.distributed has started (the backend and the mesh it checks are then the cluster's), before
  # the workdir is made.
  validated(command)
  try:
    files.makedirs(workdir)
  except OSError as e:
    raise BadInput(f'--workdir={workdir!r} cannot be created: {e.strerror}') from None
  kwargs = {'overwrite': command.overwrite} if mode in _OVERWRITABLE else {}
  cache = compile_cache.setup(workdir, command.config.get('compile_cache', ''))
  logging.info('persistent compilation cache: %s', cache or 'off')
  try:
    with WorkdirLock(workdir, enabled=multihost.is_main_process()) as lock:
      preemption.at_forced_exit(lock.release)  # A stop the main thread cannot act on in time.
      summary = MODES[mode](command.config, workdir, **kwargs)
  except ConfigError as e:
    raise BadInput(str(e)) from None
  except PermissionError as e:  # A read-only workdir (or a file in it), found when first written.
    raise BadInput(f'cannot write {e.filename!r} ({e.strerror}): give a writable --workdir') from None
  except NonFiniteLoss as e:  # The last checkpoint is kept; the settings, not the code, must change.
    raise BadInput(f'{e}: training diverged; lower config.optim.base_lr (or config.tokenizer_train.lr), or '
                   'raise the clipping (config.optim.clip_norm), and run again') from None
  except Exception as e:  # pylint: disable=broad-except
    fault = storage_fault(e)  # A full disk, a quota: the storage's fault, told in one line.
    if fault is None:
      raise
    raise BadInput(fault) from None
  finally:
    compile_cache.log()  # Every process: each host's log tells what it compiled and what it loaded.
  if multihost.is_main_process():
    print(json.dumps({k: v for k, v in summary.items() if k != 'report'}, indent=1, default=str))
    if summary.get('report'):  # The few lines a person reads at the end.
      print('\n'.join(summary['report']))
  if summary.get('stopped_by') and not summary.get('complete', True):
    logging.warning('stopped by %s at step %s; run the same command again to resume',
                    summary['stopped_by'], summary.get('end_step'))
    return PREEMPTED_EXIT_CODE
  return 0


def _report(e: BadInput) -> int:
  print(f'error: {e}', file=sys.stderr)
  return BAD_INPUT_EXIT_CODE


def _stopped(e: BaseException) -> int:
  """A stop outside a training loop (Interrupted), or an abort (a second Ctrl-C in one): its line, its status."""
  status, line = preemption.exit_of(e)
  print(line, file=sys.stderr)
  return status


def run(argv: list[str]) -> int:
  """`python -m srdd_jax.main` with the command line `argv` (argv[0] the program), in this process:
  parse, then execute. Returns the exit status the command has, a bad input's one-line message on
  stderr (status 2); any other exception is a bug and is raised."""
  try:
    return execute(parse(argv))
  except BadInput as e:
    return _report(e)
  except (preemption.Interrupted, KeyboardInterrupt) as e:
    return _stopped(e)


def _parse_flags(argv):
  """app.run's parse of absl's global flags, with a bad --config file or override an exit-2 message, not a
  traceback."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    sys.exit(_report(BadInput(checks.diagnose(argv, e))))


def _raised_in_orbax(exc_info) -> bool:
  tb = exc_info[2] if exc_info else None
  while tb is not None:
    if '/orbax/' in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


class QuietLibraries(std_logging.Filter):
  """Orbax logs every step of every save at INFO; our progress lines would drown in it. Its errors keep
  their line, not their traceback: a failure reaches the main thread, which reports it once. The same
  failure's write tasks, garbage-collected with their exception unread, make asyncio log "Task exception
  was never retrieved" with the traceback, whenever the collector runs (a CI run saw it once in three):
  dropped."""

  def filter(self, record):
    if record.name == 'asyncio' and _raised_in_orbax(record.exc_info):
      return False
    if '/orbax/' not in record.pathname:
      return True
    if record.levelno >= std_logging.WARNING:
      record.exc_info, record.exc_text = None, None
      return True
    return False


def _quiet_unraisable(unraisable):
  """After a failed Orbax save (a full disk), TensorStore's callbacks find their event loop closed, each
  printing a traceback: the failure itself is reported once, by the main thread."""
  if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == 'Event loop is closed':
    return
  sys.__unraisablehook__(unraisable)


def main(argv):
  logging.get_absl_handler().addFilter(QuietLibraries())
  sys.unraisablehook = _quiet_unraisable
  try:
    # SIGTERM or Ctrl-C from here on, outside a training loop, unwinds the run to status 75.
    preemption.stop_on_signals()
    if len(argv) > 1:
      raise _unexpected(argv[1:])
    status = execute(_command(_FLAGS, sys.argv))
  except BadInput as e:
    status = _report(e)
  except (preemption.Interrupted, KeyboardInterrupt) as e:
    status = _stopped(e)
  if status:
    # Everything this run saved is saved (checkpoints waited for, the lock released). Leaving now skips
    # the interpreter's teardown, where background threads of a failed save print more tracebacks or
    # keep the process alive: a scheduler's grace period after SIGTERM is short.
    for stream in (sys.stdout, sys.stderr):
      stream.flush()
    logging.flush()
    os._exit(status)  # pylint: disable=protected-access


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
