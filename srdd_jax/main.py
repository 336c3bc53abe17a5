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
flags.mark_flags_as_required(['config', 'workdir'])

_NOT_YET = ('tokenize', 'train_tokenizer', 'eval')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  if mode in _NOT_YET:
    logging.error('--mode=%s is not implemented yet in this version of srdd_jax; available: '
                  'reconstruct, train, sample, edit', mode)
    sys.exit(2)
  os.makedirs(workdir, exist_ok=True)
  # pylint: disable=import-outside-toplevel
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
  else:
    from srdd_jax.diffusion import cli
    try:
      summary = cli.run_sample(config, workdir) if mode == 'sample' else cli.run_edit(config, workdir)
    except cli.ConfigError as e:
      logging.error('%s', e)
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  app.run(main)
