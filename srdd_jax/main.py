"""Entry point: python -m srdd_jax.main --config=configs/<x>.py --workdir=DIR --mode=<mode>.

Modes: `train_tokenizer` (the VQ-VAE, configs/tokenizer_smoke.py), `tokenize` (a token cache of a data
set), `train` (the transformer), `sample`, `edit` and `eval` (from trained or converted checkpoints,
configs/sample.py), `reconstruct` (tokenizer round trip with PSNR), `all` (every stage of an embedded
config in order: configs/fashion_mnist.py). Several processes: --multihost, or --coordinator_address,
--num_processes, --process_id (launch/README.md).
"""
import importlib
import json
import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/<x>.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for outputs, checkpoints and logs.')
_MODE = flags.DEFINE_enum('mode', 'reconstruct', ['reconstruct', 'train', 'sample', 'edit', 'tokenize',
                                                   'train_tokenizer', 'eval', 'all'],
                            'What to run.')
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Start jax.distributed with the cluster detected by '
                                'JAX (TPU pods, SLURM, Open MPI).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a manual '
                                   'multi-process start (or $SRDD_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes of a manual multi-process start '
                                      '(or $SRDD_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1 (or '
                                   '$SRDD_PROCESS_ID).')
flags.mark_flags_as_required(['config', 'workdir'])

# --mode -> (module, function(config, workdir) -> summary dict).
_RUNNERS = {
    'reconstruct': ('srdd_jax.reconstruct', 'run'),
    'all': ('srdd_jax.stages', 'run_all'),
    'train': ('srdd_jax.train.loop', 'run_train'),
    'tokenize': ('srdd_jax.train.tokenize', 'run_tokenize'),
    'train_tokenizer': ('srdd_jax.tokenizer.train_loop', 'run_train_tokenizer'),
    'sample': ('srdd_jax.diffusion.cli', 'run_sample'),
    'edit': ('srdd_jax.diffusion.cli', 'run_edit'),
    'eval': ('srdd_jax.evaluation.run', 'run_eval'),
}


def _config_errors() -> tuple[type[Exception], ...]:
  """The errors that mean "this config cannot work" (exit 2 with the message), not a bug."""
  # pylint: disable=import-outside-toplevel
  from srdd_jax.diffusion.cli import ConfigError
  from srdd_jax.tokenizer.train_config import TokenizerTrainConfigError
  from srdd_jax.train.checkpoint import CheckpointMismatch
  from srdd_jax.train.loop import TrainConfigError
  return (ConfigError, TokenizerTrainConfigError, CheckpointMismatch, TrainConfigError)


class _QuietLibraries(std_logging.Filter):
  """Orbax logs every step of every save at INFO; our progress lines would drown in it."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  # pylint: disable=import-outside-toplevel
  from srdd_jax.parallel import multihost
  try:
    multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_MULTIHOST.value)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  os.makedirs(workdir, exist_ok=True)
  module, function = _RUNNERS[mode]
  run = getattr(importlib.import_module(module), function)
  try:
    summary = run(config, workdir)
  except _config_errors() as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if multihost.is_main_process():
    print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  app.run(main)
