"""Test set-up: 8 forced CPU devices, true float32 matmuls, a persistent compilation cache, and the
reference vectors.

Reference vectors of the official PyTorch code come in two sets. The compact files (`compact_*.npz`)
are part of the repository, in tests/data/reference: their tests run everywhere, and a missing one is a
failure. The large files live in $SRDD_REFERENCE_DIR (default ../shared/reference beside the clone); a
missing large file skips its tests with a message, except under CI=true where it is a failure.
"""
import importlib.util
import os
import sys

# The suite compiles some hundreds of small programs, and compiling is most of its time. Two XLA:CPU
# settings cut that work by a third or more: LLVM without its optimisation passes (tests/test_train.py: 108 s cold instead
# of 170 s on 2 cores), and XLA's older elemental emitters for fusions instead of the MLIR fusion
# emitters (the compact transformer's sampler compiles in 1.0-1.7 s instead of 2.4-3.4 s; the cold suite
# took 441 s instead of 593 s, same machine, same day). The generated code is slower, but these programs
# run for milliseconds. Both emitters lower the same HLO with fast-math off, matmuls and convolutions call
# the same precompiled library kernels, and every parity test passes either way.
# SRDD_TEST_XLA_OPT=1 keeps XLA's default, optimised code.
FAST_COMPILE = ('' if os.environ.get('SRDD_TEST_XLA_OPT') == '1' else
                '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true '
                '--xla_cpu_use_fusion_emitters=false')


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS of a subprocess a test starts: `devices` forced CPU devices (None: one) and FAST_COMPILE."""
  count = f'--xla_force_host_platform_device_count={devices}' if devices else ''
  return f'{count} {FAST_COMPILE}'.strip()


os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags(8)}".strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The ahead-of-time TPU tests load libtpu, which takes a host-wide lockfile (/tmp/libtpu_lockfile):
# under two pytest workers (make test) the second loader would fail with "Internal error when
# accessing libtpu multi-process lockfile". Compiling for a topology touches no TPU, so sharing is safe.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
# JAX's persistent compilation cache, inherited by the subprocesses tests start: a second run of the
# suite reuses the programs of the first (tests/test_train.py: 170 s cold, 56 s warm); a cold run (CI)
# gains little. A cached program is the same executable, keyed by its HLO, options and library
# versions, so what is tested does not change. Under .pytest_cache, so `make clean` removes it.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.pytest_cache', 'jax_compilation_cache'))

import jax  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position

jax.config.update('jax_default_matmul_precision', 'highest')
flags.FLAGS(sys.argv[:1])  # absl flags parsed, so code that reads them works under pytest.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_DIR = os.path.abspath(os.environ.get('SRDD_REFERENCE_DIR',
                                               os.path.join(REPO, '..', 'shared', 'reference')))
COMPACT_REFERENCE_DIR = os.path.join(REPO, 'tests', 'data', 'reference')

COMPACT_FILES = ('compact_vqvae_32.npz', 'compact_var_d2_w64.npz', 'compact_var_d2_w64_saln_nol2.npz')
# The tokenizer files of both sets: the compact one proves the same parity everywhere.
VQVAE_FILES = ('compact_vqvae_32.npz', 'vqvae_ch32_256.npz')


def reference_file(name: str) -> str:
  """The path of reference file `name`; skips (fails under CI=true) where a large file is absent."""
  if name.startswith('compact_'):
    path = os.path.join(COMPACT_REFERENCE_DIR, name)
    if not os.path.isfile(path):
      pytest.fail(f'reference file {path} is missing from the repository')
    return path
  path = os.path.join(REFERENCE_DIR, name)
  if not os.path.isfile(path):
    msg = (f'reference file {path} is missing (set SRDD_REFERENCE_DIR to the folder of the '
           'reference .npz files)')
    if os.environ.get('CI', '').lower() == 'true':
      pytest.fail(msg)
    pytest.skip(msg)
  return path


def require_libtpu():
  """Skips the calling test where libtpu is not installed (fails under CI=true, whose install has it:
  setup.py's test extra). With libtpu present, whatever goes wrong in the test is a failure."""
  if importlib.util.find_spec('libtpu') is None:
    msg = "libtpu is not installed (pip install -e '.[test]'): no TPU topology to compile for"
    if os.environ.get('CI', '').lower() == 'true':
      pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope='session', params=VQVAE_FILES)
def vqvae_ref(request):
  """(npz dict, VQVAEConfig, converted params) of each tokenizer reference file."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from srdd_jax.convert import var_vqvae  # pylint: disable=import-outside-toplevel
  from srdd_jax.convert.reference import vqvae_config_from_meta  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  path = reference_file(request.param)
  with np.load(path) as z:
    data = {k: z[k] for k in z.files}
  meta = json.loads(str(data['meta']))
  config = vqvae_config_from_meta(meta, path)
  params = var_vqvae.convert_vqvae({k[4:]: v for k, v in data.items() if k.startswith('vae/')}, config)
  return data, config, params


def save_tiny_models(root) -> tuple[str, str]:
  """A tiny tokenizer (16 px, patch_nums 1..4) and class-conditional transformer (10 classes), untrained,
  saved under `root` as a user's checkpoints would be: (transformer dir, tokenizer dir)."""
  # pylint: disable=import-outside-toplevel
  import numpy as np
  from srdd_jax.convert import params_io
  from srdd_jax.tokenizer.api import Tokenizer, unbox
  from srdd_jax.tokenizer.vqvae import VQVAEConfig
  from srdd_jax.transformer.config import VARConfig
  from srdd_jax.transformer.model import VAR
  pn = (1, 2, 3, 4)
  vq = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2), patch_nums=pn)
  vc = VARConfig(depth=1, width=64, num_heads=1, num_classes=10, vocab_size=64, z_channels=8, patch_nums=pn)
  x = np.zeros((1, vc.seq_len - 1, 8), np.float32)
  # Compiled: the transformer's init op by op costs 2.5x the CPU (the tokenizer's is cheaper op by op).
  var = jax.jit(lambda k: unbox(VAR(vc).init(k, np.zeros((1,), np.int32), x)['params']))(jax.random.PRNGKey(0))
  params_io.save_params(os.path.join(root, 'vae'), unbox(Tokenizer(vq).init(jax.random.PRNGKey(1))),
                        kind='vqvae', config=vq)
  params_io.save_params(os.path.join(root, 'var'), var, kind='var', config=vc)
  return os.path.join(root, 'var'), os.path.join(root, 'vae')


def save_small_tokenizer(root) -> str:
  """The cheapest tokenizer of the scales 1..4, untrained, saved under `root`: 8 px images (sklearn
  digits' own size), one downsampling, one residual block per level, no attention. For runs whose
  properties do not depend on the tokenizer: fewer and smaller arrays to load and programs to compile."""
  # pylint: disable=import-outside-toplevel
  from srdd_jax.convert import params_io
  from srdd_jax.tokenizer.api import Tokenizer, unbox
  from srdd_jax.tokenizer.vqvae import VQVAEConfig
  vq = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1, using_sa=False,
                   using_mid_sa=False, patch_nums=(1, 2, 3, 4))
  return params_io.save_params(os.path.join(root, 'vae'), unbox(Tokenizer(vq).init(jax.random.PRNGKey(1))),
                               kind='vqvae', config=vq)


@pytest.fixture(scope='session')
def small_tokenizer(tmp_path_factory):
  """save_small_tokenizer once per test process (read-only): its directory."""
  return save_small_tokenizer(str(tmp_path_factory.mktemp('small_tokenizer')))


@pytest.fixture(scope='session')
def tiny_models(tmp_path_factory):
  """save_tiny_models once per test process, shared by the tests that only read them: (transformer dir,
  tokenizer dir). A test that writes into them must save its own."""
  return save_tiny_models(str(tmp_path_factory.mktemp('tiny_models')))


def smoke_config(**train):
  """configs/smoke.py on the 8 forced devices (data=8), with train-section overrides."""
  from configs import smoke  # pylint: disable=import-outside-toplevel
  c = smoke.get_config()
  c.mesh.data = 8
  c.train.update(train)
  return c
