"""Test set-up: 8 forced CPU devices, true float32 matmuls, and the reference vectors.

The reference files live in $SRDD_REFERENCE_DIR (default ../shared/reference beside the clone). A
missing file skips its tests with a message, except under CI=true where it is a failure.
"""
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position

jax.config.update('jax_default_matmul_precision', 'highest')
flags.FLAGS(sys.argv[:1])  # absl flags parsed, so code that reads them works under pytest.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_DIR = os.path.abspath(os.environ.get('SRDD_REFERENCE_DIR',
                                               os.path.join(REPO, '..', 'shared', 'reference')))


def reference_file(name: str) -> str:
  path = os.path.join(REFERENCE_DIR, name)
  if not os.path.isfile(path):
    msg = (f'reference file {path} is missing (set SRDD_REFERENCE_DIR to the folder of the '
           'reference .npz files)')
    if os.environ.get('CI', '').lower() == 'true':
      pytest.fail(msg)
    pytest.skip(msg)
  return path


@pytest.fixture(scope='session')
def vqvae_ref():
  """(npz dict, VQVAEConfig, converted params) of vqvae_ch32_256.npz."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from srdd_jax.convert import var_vqvae  # pylint: disable=import-outside-toplevel
  from srdd_jax.tools.reference_vqvae import vqvae_config_from_meta  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  path = reference_file('vqvae_ch32_256.npz')
  with np.load(path) as z:
    data = {k: z[k] for k in z.files}
  meta = json.loads(str(data['meta']))
  config = vqvae_config_from_meta(meta, path)
  params = var_vqvae.convert_vqvae({k[4:]: v for k, v in data.items() if k.startswith('vae/')}, config)
  return data, config, params
