"""srdd_jax.bench on tiny models: the timed records, the Markdown table, and an ahead-of-time TPU compile
from this host (skipped, with the reason, where libtpu is missing; a failure under CI=true)."""
import json

import pytest

from srdd_jax.bench import aot, cli, flags, timing
from srdd_jax.bench.base import RECORD_FIELDS, model_config, train_flops
from srdd_jax.parallel import mesh as pm
from srdd_jax.tokenizer.vqvae import VQVAEConfig
from srdd_jax.transformer.config import VARConfig
from tests.conftest import require_libtpu

PN = (1, 2, 3, 4)


def tiny_configs(mask='markov', dtype='float32'):
  var = VARConfig(depth=1, width=64, num_heads=1, num_classes=10, vocab_size=64, z_channels=8, patch_nums=PN,
                  mask=mask, dtype=dtype)
  vae = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2), patch_nums=PN)
  return var, vae


@pytest.fixture(scope='module')
def v5e_devices():
  require_libtpu()
  return aot.topology_devices('v5e:2x2')


def test_aot_train_step_for_a_tpu_topology_reports_memory_and_flops(v5e_devices):
  var, vae = tiny_configs(dtype='bfloat16')
  mesh = pm.make_mesh((1, -1, 1), v5e_devices)
  rec = aot.aot_train(var, vae, 'v5e:2x2', v5e_devices, mesh, 'fsdp', batch=8)
  assert rec['kind'] == 'aot_train' and rec['chips'] == 4 and rec['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1}
  assert set(aot.AOT_FIELDS) <= set(rec)
  assert rec['per_chip_bytes'] > 0 and rec['xla_flops'] > 0 and rec['xla_bytes_accessed'] > 0
  for k in ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes', 'alias_size_in_bytes',
            'generated_code_size_in_bytes'):
    assert k in rec['memory'], k
  assert rec['memory']['argument_size_in_bytes'] > 0
  assert rec['hbm_bytes'] == 16 * 2**30 and rec['fits'] is True
  json.dumps(rec)  # What goes into the JSON file.


def test_aot_flags_name_the_offending_value(v5e_devices):
  var, _ = tiny_configs()
  with pytest.raises(ValueError, match='--mesh 3,-1,1'):
    aot.run_aot('v5e:2x2', var, ('markov',), 8, 8, (3, -1, 1), 'fsdp')
  with pytest.raises(ValueError, match="--rules 'tensor'"):
    aot.run_aot('v5e:2x2', var, ('markov',), 8, 8, (1, -1, 1), 'tensor')


def test_timed_records_have_the_schema_fields():
  # Batch 8: the tests' 8 CPU devices split it over the data axis.
  # One mask keeps it cheap; both run the same record code.
  records = timing.run_timed(depths=(1,), batches=(8,), sample_batches=(8,), masks=('markov',),
                             dtype='float32', repeats=1, warmup=0, tokenizer_ch=32, peak=1e11, width=32,
                             heads=1, patch_nums=(1, 2))
  assert [(r['kind'], r['mode']) for r in records] == [('train', 'markov'), ('sample', 'markov')]
  for r in records:
    assert 'error' not in r, r.get('error')
    assert set(RECORD_FIELDS) <= set(r)
    assert (r['depth'], r['width'], r['heads'], r['batch'], r['seq_len']) == (1, 32, 1, 8, 5)
    assert r['seconds'] > 0 and r['compile_s'] > 0 and r['memory_bytes'] > 0
    assert r['seconds'] == pytest.approx(r['all_s'][0], abs=1e-5) and r['tokens_per_s'] > 0 and r['images_per_s'] > 0
  train, sample = records[0], records[1]
  assert train['analytic_flops'] == train_flops(model_config(1, 'markov', 'float32', 32, 1, (1, 2)),
                                                8)['train_per_step']
  assert train['xla_flops'] > 0 and train['utilisation'] == pytest.approx(
      train['analytic_flops_per_s'] / 1e11)
  assert sample['images_per_s_tokens_only'] >= sample['images_per_s']
  assert sample['tokenizer']['ch'] == 32 and sample['tokenizer']['full_size'] is False
  assert sample['sampler']['top_k'] == 900 and sample['sampler']['cfg'] == 1.5
  assert sample['sanity']['image_finite']
  json.dumps(records)


def test_markdown_table_renders_every_kind():
  base = {'mode': 'markov', 'depth': 6, 'width': 384, 'batch': 8, 'seconds': 1.5, 'memory_bytes': 2**30}
  records = [
      {**base, 'kind': 'train', 'tokens_per_s': 3626.7, 'images_per_s': 5.33, 'analytic_flops_per_s': 2e11,
       'xla_flops_per_s': 2.2e11, 'utilisation': 0.5},
      {**base, 'kind': 'sample', 'batch': 32, 'images_per_s': 2.0, 'images_per_s_tokens_only': 4.0},
      {**base, 'kind': 'train', 'mode': 'causal', 'error': 'RuntimeError: out of memory\nmore'},
      {**base, 'kind': 'aot_train', 'topology': 'v5p:2x2x2', 'chips': 8, 'mesh': {'data': 1, 'fsdp': 8,
       'tensor': 1}, 'per_chip_bytes': 3 * 2**30, 'hbm_bytes': 95 * 2**30, 'fits': True, 'xla_flops': 4e12,
       'xla_bytes_accessed': 5e10, 'generated_code_bytes': 2**21, 'compile_s': 12.0},
  ]
  text = cli.markdown_table(records)
  lines = text.splitlines()
  assert lines[0].startswith('| mode | kind | depth | width | batch | s (median) | tokens/s |')
  assert '| markov | train | 6 | 384 | 8 | 1.500 | 3,627 | 5.33 | - | 0.2 | 0.22 | 0.500 | 1.00 |' in lines
  assert '| markov | sample | 6 | 384 | 32 | 1.500 | - | 2.00 | 4.00 | - | - | - | 1.00 |' in lines
  assert any(l.startswith('| causal | train | 6 | 384 | 8 | error: RuntimeError: out of memory |') for l in lines)
  assert '| markov | aot_train | v5p:2x2x2 | 8 | 1x8x1 | 6 | 8 | 3.00 | 95.00 | True | 4 | 50 | 2.00 | 12.0 |' in lines
  assert all(l.count('|') == lines[0].count('|') for l in lines[:5] if l)


@pytest.mark.parametrize('argv, says', [
    (['--depths', '0'], '--depths 0: every value must be >= 1'),
    (['--depths=-2'], '--depths -2: every value must be >= 1'),
    (['--batches', '8,0'], '--batches 8,0: every value must be >= 1'),
    (['--patch_nums', '1,3,2'], '--patch_nums 1,3,2: the sides must increase strictly')])
def test_bad_values_exit_2_before_anything_runs(tmp_path, capsys, argv, says):
  out = tmp_path / 'x.json'
  with pytest.raises(SystemExit) as e:
    cli.main(['--quick', '--out', str(out)] + argv)
  err = capsys.readouterr().err
  assert e.value.code == 2 and says in err and err.count('error:') == 1, err
  assert not out.exists()


def test_bad_flags_are_named(capsys):
  for argv, says in ((['--masks', 'markov,block'], "--masks 'markov,block': 'block' is not one of"),
                     (['--batch', '64'], '--batch is for --aot'),
                     (['--warmup', '-1'], '--warmup -1: must be >= 0')):
    with pytest.raises(SystemExit) as e:
      flags.parse_args(['--out', 'x.json'] + argv)
    assert e.value.code == 2, argv
    err = capsys.readouterr().err
    assert says in err and err.count('error:') == 1, err
  assert aot.hbm_bytes('v5p:4x4x4') == 95 * 2**30 and aot.hbm_bytes('v6e:2x2') == 32 * 2**30
  assert aot.hbm_bytes('x', 'TPU v5 lite') == 16 * 2**30 and aot.hbm_bytes('x', 'cpu') is None
