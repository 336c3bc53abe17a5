"""Entry point: python -m srdd_jax.main --config=configs/<x>.py --workdir=DIR --mode=<mode>.

Modes available now: `reconstruct` (tokenizer: images -> per-scale tokens -> images, with PSNR),
`sample` and `edit` (from converted checkpoints, see configs/sample.py). `train`, `tokenize`,
`train_tokenizer` and `eval` are added by later work and are refused with a clear message until then.
"""
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/<x>.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for outputs, checkpoints and logs.')
_MODE = flags.DEFINE_enum('mode', 'reconstruct', ['reconstruct', 'train', 'sample', 'edit', 'tokenize',
                                                   'train_tokenizer', 'eval'], 'What to run.')
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Start jax.distributed with the cluster detected by '
                                'JAX (TPU pods, SLURM, Open MPI).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a manual '
                                   'multi-process start (or $SRDD_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes of a manual multi-process start '
                                      '(or $SRDD_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1 (or '
                                   '$SRDD_PROCESS_ID).')
flags.mark_flags_as_required(['config', 'workdir'])

_NOT_YET = ('train_tokenizer', 'eval')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  if mode in _NOT_YET:
    logging.error('--mode=%s is not implemented yet in this version of srdd_jax; available: '
                  'reconstruct, train, sample, edit', mode)
    sys.exit(2)
  # pylint: disable=import-outside-toplevel
  from srdd_jax.parallel import multihost
  try:
    multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_MULTIHOST.value)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  os.makedirs(workdir, exist_ok=True)
  if mode == 'reconstruct':
    from srdd_jax import reconstruct
    summary = reconstruct.run(config, workdir)
  elif mode == 'train':
    from srdd_jax.train import loop
    from srdd_jax.train.checkpoint import CheckpointMismatch
    try:
      summary = loop.run_train(config, workdir)
    except (loop.TrainConfigError, CheckpointMismatch) as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
  elif mode == 'tokenize':
    from srdd_jax.train import loop, tokenize
    try:
      summary = tokenize.run_tokenize(config, workdir)
    except loop.TrainConfigError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
  else:
    from srdd_jax.diffusion import cli
    try:
      summary = cli.run_sample(config, workdir) if mode == 'sample' else cli.run_edit(config, workdir)
    except cli.ConfigError as e:
      logging.error('%s', e)
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
  if multihost.is_main_process():
    print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  app.run(main)
