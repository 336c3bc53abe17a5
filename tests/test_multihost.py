"""Multi-host training for real: 2 processes on localhost (gloo CPU collectives, 2 devices each) against
1 process with 4 devices, same global batches.

configs/smoke.py at depth 1 (whether processes agree does not depend on the depth), with a saved
tokenizer: every process loads it instead of initialising one op by op (seconds of small compiles each).
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np

from srdd_jax.convert import params_io
from srdd_jax.tokenizer.api import Tokenizer, tokenizer_config, unbox
from tests.conftest import smoke_config, xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ['--config=configs/smoke.py', '--mode=train', '--config.train.steps=5', '--config.train.checkpoint_every=5',
        '--config.model.depth=1']


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_two_processes_train_like_one(tmp_path):
  vq = tokenizer_config(smoke_config())
  # NumPy arrays, as the converter writes them (Orbax restores a saved jax.Array on its saved devices).
  params = jax.device_get(jax.jit(lambda k: unbox(Tokenizer(vq).init(k)))(jax.random.PRNGKey(1)))
  params_io.save_params(str(tmp_path / 'vae'), params, kind='vqvae', config=vq)
  args = ARGS + [f'--config.tokenizer.checkpoint={tmp_path / "vae"}']
  env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS='cpu')
  one_env = dict(env, XLA_FLAGS=xla_flags(4))
  # Both jobs at once: the 2-core machine then spends one compile's wall time, not two.
  one = subprocess.Popen([sys.executable, '-m', 'srdd_jax.main', f'--workdir={tmp_path / "one"}', *args],
                         cwd=REPO, env=one_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  two = subprocess.run(['bash', 'launch/local.sh', '2', '2', str(tmp_path / 'logs'), '--',
                        f'--workdir={tmp_path / "two"}', *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  out_one, _ = one.communicate(timeout=600)
  logs = [(tmp_path / 'logs' / f'process_{i}.log').read_text() for i in range(2)]
  assert two.returncode == 0, two.stderr + logs[0][-2000:] + logs[1][-2000:]
  assert one.returncode == 0, out_one[-3000:]
  assert 'process 1 of 2, 2 local / 4 global devices' in logs[1]
  a, b = _records(tmp_path / 'one'), _records(tmp_path / 'two')
  # Process 0 alone writes: one record per step, not one per process.
  assert [r['step'] for r in b] == [1, 2, 3, 4, 5] == [r['step'] for r in a]
  np.testing.assert_allclose([r['loss'] for r in b], [r['loss'] for r in a], rtol=1e-5)
  np.testing.assert_allclose([r['grad_norm'] for r in b], [r['grad_norm'] for r in a], rtol=1e-4)
  assert '5' in os.listdir(tmp_path / 'two' / 'checkpoints')  # Saved by both processes together.
