"""Entry point: python -m srdd_jax.main --config=configs/<x>.py --workdir=DIR --mode=<mode>.

Modes: `train_tokenizer` (the VQ-VAE, configs/tokenizer_smoke.py), `tokenize` (a token cache of a data
set), `train` (the transformer), `sample`, `edit` and `eval` (from trained or converted checkpoints,
configs/sample.py), `reconstruct` (tokenizer round trip with PSNR), `all` (every stage of an embedded
config in order: configs/fashion_mnist.py). Several processes: --multihost, or --coordinator_address,
--num_processes, --process_id (launch/README.md).
"""
import json
import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from srdd_jax.config import ConfigError
from srdd_jax.modes import all as all_stages
from srdd_jax.modes import edit
from srdd_jax.modes import eval as evaluation
from srdd_jax.modes import reconstruct, sample, tokenize, train, train_tokenizer
from srdd_jax.parallel import multihost

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

# --mode -> its runner: run(config, workdir) -> summary dict.
_MODES = {
    'reconstruct': reconstruct.run,
    'all': all_stages.run,
    'train': train.run,
    'tokenize': tokenize.run,
    'train_tokenizer': train_tokenizer.run,
    'sample': sample.run,
    'edit': edit.run,
    'eval': evaluation.run,
}


class _QuietLibraries(std_logging.Filter):
  """Orbax logs every step of every save at INFO; our progress lines would drown in it."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  try:
    multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_MULTIHOST.value)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  os.makedirs(workdir, exist_ok=True)
  try:
    summary = _MODES[mode](config, workdir)
  except ConfigError as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if multihost.is_main_process():
    print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  app.run(main)
