"""The VQ-VAE converter: full manifest mapping, strict errors, save/load, the CLI."""
import json
import os
import sys

import numpy as np
import pytest

from srdd_jax.convert import params_io
from srdd_jax.convert import state_dict as sd
from srdd_jax.convert import var_vqvae
from srdd_jax.tokenizer.vqvae import VQVAEConfig, count_params
from srdd_jax.tools import convert_var
from tests.conftest import reference_file


@pytest.fixture(scope='module')
def ref_state():
  with np.load(reference_file('vqvae_ch32_256.npz')) as z:
    return {k[4:]: z[k] for k in z.files if k.startswith('vae/')}


def test_manifest_of_released_vqvae_maps_every_key_and_counts_params():
  with open(reference_file('checkpoint_manifests.json')) as f:
    shapes = json.load(f)['vae_ch160v4096z32']
  assert len(shapes) == 324
  config = VQVAEConfig(ch=160)
  km = var_vqvae.map_vqvae(shapes, config)
  assert len(km.targets) + len(km.dropped) == 324
  assert km.dropped == ['quantize.ema_vocab_hit_SV']
  assert count_params(var_vqvae.unbox(var_vqvae.abstract_params(config))) == 108_948_355
  # The architecture is read from the keys and shapes alone.
  assert var_vqvae.infer_vqvae_config(shapes) == config


def test_cli_checks_manifest(capsys):
  rc = convert_var.main(['--manifest', reference_file('checkpoint_manifests.json'),
                         '--manifest_key', 'vae_ch160v4096z32'])
  assert rc == 0
  assert '108,948,355 parameters' in capsys.readouterr().out


def test_conversion_layout(ref_state):
  params = var_vqvae.convert_vqvae(ref_state, VQVAEConfig(ch=32))
  k = params['encoder']['down_2']['block_0']['nin_shortcut']['kernel']
  w = ref_state['encoder.down.2.block.0.nin_shortcut.weight']  # (out, in, 1, 1)
  assert k.shape == (1, 1, 32, 64) and k.dtype == np.float32
  np.testing.assert_array_equal(k[0, 0], w[:, :, 0, 0].T.astype(np.float32))
  np.testing.assert_array_equal(params['quantize']['embedding']['embedding'],
                                ref_state['quantize.embedding.weight'].astype(np.float32))
  np.testing.assert_array_equal(params['decoder']['mid']['attn_1']['norm']['scale'],
                                ref_state['decoder.mid.attn_1.norm.weight'].astype(np.float32))


def test_one_error_lists_missing_misshaped_and_unexpected_keys(ref_state):
  state = dict(ref_state)
  del state['decoder.up.3.block.1.conv2.bias']
  state['encoder.mid.attn_1.qkv.weight'] = np.zeros((384, 128, 3, 3), np.float16)
  state['encoder.extra_head.weight'] = np.zeros((4,), np.float16)
  with pytest.raises(sd.StateDictMismatch) as e:
    var_vqvae.convert_vqvae(state, VQVAEConfig(ch=32))
  msg = str(e.value)
  assert '1 unexpected key(s)' in msg and 'encoder.extra_head.weight' in msg
  assert '1 missing parameter(s)' in msg and 'decoder/up_3/block_1/conv2/bias (64,)' in msg
  assert '1 key(s) with a wrong shape' in msg
  assert 'encoder.mid.attn_1.qkv.weight: shape (384, 128, 3, 3)' in msg and '(1, 1, 128, 384)' in msg


def test_wrong_architecture_is_rejected(ref_state):
  with pytest.raises(sd.StateDictMismatch, match='wrong shape'):
    var_vqvae.convert_vqvae(ref_state, VQVAEConfig(ch=64))
  with pytest.raises(sd.StateDictMismatch, match='missing'):
    var_vqvae.convert_vqvae(ref_state, VQVAEConfig(ch=32, share_quant_resi=6))


def test_pth_without_torch_says_what_to_do(tmp_path, monkeypatch):
  path = tmp_path / 'vae.pth'
  path.write_bytes(b'not really a checkpoint')
  monkeypatch.setitem(sys.modules, 'torch', None)  # Makes `import torch` fail.
  with pytest.raises(ImportError, match='needs torch, which srdd_jax does not install'):
    sd.load_state_dict(str(path))
  with pytest.raises(FileNotFoundError, match='nope.pth'):
    sd.load_state_dict(str(tmp_path / 'nope.pth'))


def test_cli_converts_saves_loads_and_never_overwrites(tmp_path, ref_state, capsys):
  src = reference_file('vqvae_ch32_256.npz')
  out = tmp_path / 'vae'
  assert convert_var.main(['--vae', src, '--prefix', 'vae/', '--out', str(out)]) == 0
  config, params = params_io.load_vqvae(str(out))
  assert config == VQVAEConfig(ch=32)
  want = var_vqvae.convert_vqvae(ref_state, config)
  for path, leaf in sd.flatten_params(want).items():
    np.testing.assert_array_equal(sd.flatten_params(params)[path], leaf)
  meta = json.loads((out / 'model.json').read_text())
  assert meta['num_params'] == 4_612_867 and meta['source_sha256']
  before = sorted(os.listdir(out / 'params'))
  capsys.readouterr()
  assert convert_var.main(['--vae', src, '--prefix', 'vae/', '--out', str(out)]) == 2  # A bad input: exit 2.
  assert 'already holds converted parameters' in capsys.readouterr().err
  assert sorted(os.listdir(out / 'params')) == before
  with pytest.raises(FileNotFoundError, match='holds no converted parameters'):
    params_io.load_vqvae(str(tmp_path / 'empty'))
