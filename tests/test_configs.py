"""The real training configs: recipes per SPEC §8, and start-up validation that names the config key
(nothing is compiled: every error comes before the first program)."""
import importlib
import os

import pytest

from srdd_jax import config as recipe
from srdd_jax.config import ConfigError
from srdd_jax.diffusion.generate import sampler_config
from srdd_jax.modes import train as train_mode

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
  assert c.sampler.protocol == 'auto'  # Each mask samples with its method's protocol (test below).
  assert tuple(c.model.patch_nums) == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  assert dict(c.mesh) == {'data': -1, 'fsdp': -1, 'tensor': 1}
  assert (c.model.scan, c.model.remat) == (True, 'dots')  # Measured faster on an H100 (PERFORMANCE.md).
  b = _config(name, 'd30,causal')
  assert (b.model.preset, b.model.mask, b.train.global_batch, b.train.epochs) == ('d30', 'causal', 1024, 350)
  assert (b.optim.base_lr, b.optim.final_fraction, b.optim.weight_decay_end) == (8e-5, 0.01, 0.08)


# VAR's evaluation protocol for the causal baseline, SRDD's best settings for the markov model:
# (cfg, schedule, top-k, top-p, MR threshold, MR iterations).
VAR_PROTOCOL = (1.5, 'linear', 900, 0.96, 0.0, 0)
SRDD_PROTOCOL = (5.0, 'linear', 900, 0.96, 0.01, 10)
# The embedded default sets its sampler (chosen on train-split reals, docs/RESULTS.md); the ablation
# still samples each variant with the values it sets itself.
FASHION_MNIST_SAMPLER = (1.0, 'linear', 0, 1.0, 0.0, 0)


def _protocol(sc):
  return (sc.cfg, sc.cfg_schedule, sc.top_k, sc.top_p, sc.mr_threshold, sc.mr_iterations)


@pytest.mark.parametrize('name', REAL + ('fashion_mnist', 'sample'))
def test_each_mask_samples_with_its_methods_protocol(name):
  for mask, want in (('causal', VAR_PROTOCOL), ('markov', SRDD_PROTOCOL)):
    c = _config(name, mask if name != 'sample' else None)
    got = _protocol(sampler_config(c.sampler, mask))
    if name == 'fashion_mnist':  # Its own validated setting for both masks; top-k off (512 codes < 900).
      want = FASHION_MNIST_SAMPLER
    assert got == want, (name, mask)
  # A value the user sets wins over the protocol; a named protocol wins over the mask's.
  c = _config(name, 'causal' if name != 'sample' else None)
  c.sampler.cfg, c.sampler.mr_iterations = 3.0, 5
  sc = sampler_config(c.sampler, 'causal')
  assert (sc.cfg, sc.mr_iterations, sc.mr_threshold) == (3.0, 5, 0.0)
  c.sampler.protocol, c.sampler.mr_threshold = 'srdd', -1.0  # Unset: the named protocol's value.
  assert sampler_config(c.sampler, 'causal').mr_threshold == 0.01
  c.sampler.protocol = 'vra'
  with pytest.raises(ConfigError, match=r"config.sampler.protocol='vra'"):
    sampler_config(c.sampler, 'causal')


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
  with pytest.raises(ConfigError,
                     match=r"config.tokenizer.checkpoint='checkpoints/vae_ch160v4096z32' does not exist"):
    train_mode.run(_config(name), str(tmp_path))


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
  with pytest.raises(ConfigError, match=key):
    train_mode.run(c, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()  # Refused before anything is written.


def test_batch_and_patch_nums_errors_name_the_key(vae_dir, tmp_path):
  c = _config('afhq')
  c.tokenizer.checkpoint = vae_dir
  c.train.global_batch = 12  # 8 devices: data 1 x fsdp 8.
  with pytest.raises(ConfigError, match=r'config.train.global_batch=12 is not divisible by the '
                                                  r'data-parallel size 8'):
    train_mode.run(c, str(tmp_path))
  c = _config('afhq')
  c.tokenizer.checkpoint = vae_dir
  c.model.patch_nums = (1, 2, 4, 8)
  with pytest.raises(ConfigError, match=r'config.model.patch_nums=\(1, 2, 4, 8\) must end at .* 16'):
    train_mode.run(c, str(tmp_path))
  c = _config('afhq')
  c.tokenizer.checkpoint = vae_dir
  c.mesh.fsdp = 3
  with pytest.raises(ConfigError, match=r'config.mesh: .*8 devices are not divisible by 3'):
    train_mode.run(c, str(tmp_path))


# --- the one config module ------------------------------------------------------------------------

@pytest.mark.parametrize('section', sorted(k for k, v in recipe.DEFAULTS.items() if isinstance(v, dict)))
def test_an_unknown_key_is_refused_in_every_section(section):
  with pytest.raises(ConfigError, match=rf'config\.{section}\.stepz is not a key of config\.{section}; '
                                        r'known: \[.*\]'):
    recipe.with_defaults({section: {'stepz': 5}})


def test_unknown_sections_moved_keys_and_defaults():
  with pytest.raises(ConfigError, match=r'config\.trian is not a config section'):
    recipe.with_defaults({'trian': {}})
  with pytest.raises(ConfigError, match=r'config\.tokenizer\.patch_nums .* config\.model\.patch_nums'):
    recipe.with_defaults({'tokenizer': {'patch_nums': (1, 2)}})
  c = recipe.with_defaults({'train': {'steps': 7}})
  assert c.train.steps == 7 and c.train.global_batch == recipe.DEFAULTS['train']['global_batch']
  assert c.sampler.protocol == recipe.DEFAULTS['sampler']['protocol'] and tuple(c.model.patch_nums) == recipe.PATCH_NUMS_256
  assert recipe.with_defaults(c).to_dict() == c.to_dict()  # Idempotent: every runner may apply it.
  assert recipe.DEFAULTS['train']['steps'] == 0  # The defaults themselves were not changed by a merge.


def test_every_shipped_config_has_only_known_keys():
  import glob
  import os
  names = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(os.path.dirname(__file__), '..', 'configs', '*.py'))]
  assert len(names) >= 10
  for name in names:
    recipe.with_defaults(_config(name))


def test_a_runner_refuses_an_unknown_key_before_writing(tmp_path):
  c = _config('ffhq')
  c.train.stepz = 5
  with pytest.raises(ConfigError, match=r'config\.train\.stepz is not a key'):
    train_mode.run(c, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_one_function_makes_the_tokenizer_config():
  from srdd_jax.tokenizer.api import tokenizer_config
  c = recipe.with_defaults({'tokenizer': {'ch': 32, 'ch_mult': (1, 2)}, 'model': {'patch_nums': (1, 2, 4)}})
  vq = tokenizer_config(c)
  assert (vq.ch, vq.ch_mult, vq.patch_nums, vq.image_size, vq.vocab_size) == (32, (1, 2), (1, 2, 4), 8, 4096)
  c.tokenizer.image_size = 16
  with pytest.raises(ConfigError, match=r'config\.tokenizer\.image_size=16, but config\.model\.patch_nums'):
    tokenizer_config(c)


SPECS_WITH_EMA = ('fashion_mnist', 'smoke', 'ablation', 'ablation:quick', 'ablation:gpu', *REAL)


def _run_lengths(c) -> list[int]:
  """The lengths in steps of a config's runs: its steps (and the study's fine-tunes, 0 = as many), or for
  the epoch recipes a lower bound, the epochs (a batch never exceeds the data set,
  transformer_setup.check_batch_fits, so an epoch is at least one step)."""
  if int(c.train.steps) > 0:
    steps = int(c.train.steps)
    return [steps, int(c.ablation.finetune_steps) or steps]
  return [int(c.train.epochs)]


@pytest.mark.parametrize('spec', SPECS_WITH_EMA)
def test_every_config_exports_a_warmed_up_ema(spec):
  """Every preset, --quick and the tests' smoke run train an EMA, and its export keeps under 1% of the
  EMA's starting point (random initialisation, or a fine-tune's start model) at the preset's run
  lengths (the study's fine-tunes included); the scaling tool's points are its base config's."""
  from srdd_jax.train.step import ema_start_weight
  name, _, arg = spec.partition(':')
  c = _config(name, arg or None)
  assert c.train.ema_decay == 0.999, spec
  for steps in _run_lengths(c):
    assert steps >= 3 and ema_start_weight(float(c.train.ema_decay), steps) < 0.01, (spec, steps)
  assert recipe.DEFAULTS['train']['ema_decay'] == 0.999  # The scaling tool's and every config's default.
