"""The real training configs: recipes per SPEC §8, and start-up validation that names the config key
(nothing is compiled: every error comes before the first program)."""
import importlib

import pytest

from srdd_jax.train import loop, recipe

REAL = ('ffhq', 'afhq', 'sun397', 'miniimagenet', 'imagenet')
CLASSES = {'ffhq': 1, 'afhq': 3, 'sun397': 397, 'miniimagenet': 100, 'imagenet': 1000}


def _config(name, arg=None):
  return importlib.import_module(f'configs.{name}').get_config(arg)


@pytest.fixture(scope='module')
def vae_dir(tmp_path_factory):
  """VAR's tokenizer architecture at ch=32 (the reference file), converted as a user would."""
  from srdd_jax.tools import convert_var
  from tests.conftest import reference_file
  out = str(tmp_path_factory.mktemp('vae') / 'vae')
  assert convert_var.main(['--vae', reference_file('vqvae_ch32_256.npz'), '--prefix', 'vae/', '--out', out]) == 0
  return out


@pytest.mark.parametrize('name', REAL)
def test_recipe_and_sampler_settings(name):
  c = _config(name)
  assert c.model.preset == 'd16' and c.model.mask == 'markov' and c.model.num_classes == CLASSES[name]
  assert (c.train.global_batch, c.train.epochs, c.optim.base_lr, c.optim.final_fraction) == (768, 200, 1e-4, 0.1)
  assert (c.sampler.cfg, c.sampler.mr_threshold, c.sampler.mr_iterations) == (5.0, 0.01, 10)
  assert tuple(c.model.patch_nums) == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  assert dict(c.mesh) == {'data': -1, 'fsdp': 8, 'tensor': 1}
  b = _config(name, 'd30,causal')
  assert (b.model.preset, b.model.mask, b.train.global_batch, b.train.epochs) == ('d30', 'causal', 1024, 350)
  assert (b.optim.base_lr, b.optim.final_fraction, b.optim.weight_decay_end) == (8e-5, 0.01, 0.08)


def test_config_arguments_are_checked():
  assert recipe.parse_arg('d20,causal,source=folder', preset='d16', mask='markov', source='tfds') == {
      'preset': 'd20', 'mask': 'causal', 'source': 'folder'}
  with pytest.raises(ValueError, match="config argument 'd17'"):
    _config('ffhq', 'd17')
  with pytest.raises(ValueError, match="'res' is not one of"):
    _config('afhq', 'res=512')
  assert _config('imagenet', 'source=folder').data.source == 'folder'


@pytest.mark.parametrize('name', REAL)
def test_missing_tokenizer_checkpoint_names_the_key(name, tmp_path):
  with pytest.raises(loop.TrainConfigError,
                     match=r"config.tokenizer.checkpoint='checkpoints/vae_ch160v4096z32' does not exist"):
    loop.run_train(_config(name), str(tmp_path))


@pytest.mark.parametrize('name,key', [('ffhq', r"config.data.path='data/ffhq'"),
                                      ('afhq', r"config.data.path='data/afhq/train'"),
                                      ('miniimagenet', r"config.data.path='data/miniimagenet/train'"),
                                      ('sun397', r'config.data.download'),
                                      ('imagenet', r'config.data.download')])
def test_missing_data_names_the_key(name, key, vae_dir, tmp_path):
  c = _config(name)
  c.tokenizer.checkpoint = vae_dir
  if c.data.source == 'tfds':
    c.data.data_dir = str(tmp_path / 'no_tfds_here')
  with pytest.raises(loop.TrainConfigError, match=key):
    loop.run_train(c, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()  # Refused before anything is written.


def test_batch_and_patch_nums_errors_name_the_key(vae_dir, tmp_path):
  c = _config('afhq')
  c.tokenizer.checkpoint = vae_dir
  c.train.global_batch = 12  # 8 devices: data 1 x fsdp 8.
  with pytest.raises(loop.TrainConfigError, match=r'config.train.global_batch=12 is not divisible by the '
                                                  r'data-parallel size 8'):
    loop.run_train(c, str(tmp_path))
  c = _config('afhq')
  c.tokenizer.checkpoint = vae_dir
  c.model.patch_nums = (1, 2, 4, 8)
  with pytest.raises(loop.TrainConfigError, match=r'config.model.patch_nums=\(1, 2, 4, 8\) must end at .* 16'):
    loop.run_train(c, str(tmp_path))
  c = _config('afhq')
  c.tokenizer.checkpoint = vae_dir
  c.mesh.fsdp = 3
  with pytest.raises(loop.TrainConfigError, match=r'config.mesh: .*8 devices are not divisible by 3'):
    loop.run_train(c, str(tmp_path))
