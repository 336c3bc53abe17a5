"""The training loop: exact resume, another mesh, unreadable checkpoints,
config errors, non-finite losses, SIGTERM."""
import json
import os

import jax
import numpy as np
import pytest

from srdd_jax.config import ConfigError, with_defaults
from srdd_jax.convert.loading import load_tokenizer
from srdd_jax.modes import tokenize
from srdd_jax.modes import train as train_mode
from srdd_jax.train import transformer_setup
from srdd_jax.train.driver import NonFiniteLoss
from tests.conftest import smoke_config


_config = smoke_config
# The smoke run's 20 steps: runs that stop early (stop_after_steps) instead of training fewer steps
# compile the same step program as `straight` (the step count is in the learning-rate schedule), so the
# persistent compilation cache serves it.


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], r['loss']) for r in map(json.loads, f)]


def _params(summary, which='params'):
  """The trained weights (or with which='ema_params' their EMA, what the export holds) by path."""
  return {'/'.join(map(str, k)): np.asarray(v) for k, v in
          jax.tree_util.tree_flatten_with_path(jax.device_get(getattr(summary['state'], which)))[0]}


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp('straight'))
  # Sample grids on: the resumed runs below (without grids) must still match it bitwise.
  return wd, train_mode.run(_config(sample_every=10), wd, return_state=True)


def test_sample_grids_as_png_and_tensorboard(straight):
  wd, _ = straight
  from PIL import Image
  assert sorted(os.listdir(os.path.join(wd, 'samples'))) == ['step_00000010.png', 'step_00000020.png']
  g = np.asarray(Image.open(os.path.join(wd, 'samples', 'step_00000020.png')))
  assert g.shape == (4 * 16, 2 * 16, 3) and g.std() > 0  # 4 classes x 2 samples of 16 px.
  from tensorboard.backend.event_processing import event_accumulator
  ea = event_accumulator.EventAccumulator(wd, size_guidance={'images': 0, 'tensors': 0})
  ea.Reload()
  tags = ea.Tags()
  assert any('samples' in t for t in tags.get('images', []) + tags.get('tensors', [])), tags


def test_the_trained_model_is_exported_for_sampling(straight):
  from srdd_jax.convert import params_io
  wd, full = straight
  assert full['export'] == os.path.join(wd, 'export', 'step_00000020')
  cfg, params = params_io.load_var(full['export'])
  assert (cfg.depth, cfg.width, cfg.patch_nums, cfg.mask) == (2, 64, (1, 2, 3, 4), 'markov')
  a = _params(full, 'ema_params')  # The smoke config keeps an EMA (0.999, warmed up), and exports it.
  assert not all(np.array_equal(a[k], v) for k, v in _params(full).items())
  b = {'/'.join(map(str, k)): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_fewer_steps_than_done_is_an_error_that_keeps_the_run(straight, tmp_path):
  import shutil
  wd, _ = straight
  copy = str(tmp_path / 'copy')
  shutil.copytree(wd, copy)
  before = {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(copy) for f in fs}
  with pytest.raises(ConfigError, match=r'config.train.steps=10: .*already holds step 20; give steps >= 20'):
    train_mode.run(_config(steps=10), copy)
  after = {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(copy) for f in fs}
  assert after == before  # Nothing written, nothing removed.


def test_exact_resume_is_bitwise(straight, tmp_path):
  wd, full = straight
  part = str(tmp_path / 'part')
  first = train_mode.run(_config(), part, stop_after_steps=10)
  assert first['end_step'] == 10
  second = train_mode.run(_config(), part, return_state=True)
  assert second['start_step'] == 10 and second['end_step'] == 20
  assert _losses(part) == _losses(wd)  # Bitwise equal floats, data order and RNG included.
  for which in ('params', 'ema_params'):  # The EMA's warm-up is a function of the restored step.
    a, b = _params(full, which), _params(second, which)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), which


def test_resume_on_another_mesh(straight, tmp_path):
  wd, _ = straight
  part = str(tmp_path / 'mesh')
  train_mode.run(_config(), part, stop_after_steps=10)
  c = _config()
  c.mesh.update(data=2, fsdp=2, tensor=2)
  train_mode.run(c, part)
  got, want = dict(_losses(part)), dict(_losses(wd))
  np.testing.assert_allclose([got[s] for s in range(11, 21)], [want[s] for s in range(11, 21)], rtol=1e-4)


def test_unreadable_checkpoint_is_skipped_and_kept(tmp_path):
  wd = str(tmp_path / 'crash')
  train_mode.run(_config(), wd, stop_after_steps=10)
  bad = os.path.join(wd, 'checkpoints', '15')
  os.makedirs(os.path.join(bad, 'state'))
  with open(os.path.join(bad, 'state', 'garbage'), 'w') as f:
    f.write('half a checkpoint')
  s = train_mode.run(_config(), wd, stop_after_steps=2)
  assert s['start_step'] == 10 and s['end_step'] == 12
  names = os.listdir(os.path.join(wd, 'checkpoints'))
  assert any(n.startswith('15.incomplete-') for n in names) and '10' in names and '12' in names


def test_epochs_and_progressive_growth(tmp_path):
  # 64 examples, batch 16: 4 steps; 2 of the 4 scales during the 2-step LR warm-up (steps 0-2), all from 3.
  c = _config(steps=0, epochs=1.0, progressive_start_scales=2, progressive_steps=3)
  s = train_mode.run(c, str(tmp_path))
  recs = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert s['end_step'] == 4 and [r['active_scales'] for r in recs] == [2, 2, 2, 4]
  assert [r['last_scale_loss'] for r in recs[:3]] == [-1.0] * 3 and recs[3]['last_scale_loss'] > 0
  # Utilisation against the device's peak (here a matmul measured on the CPU) in every log record.
  assert all(0 < r['mfu'] < 1 and r['tokens_per_s'] > 0 for r in recs)


def test_config_errors_name_the_key(tmp_path):
  with pytest.raises(ConfigError, match=r'config.train.global_batch=12 is not divisible by .* 8'):
    train_mode.run(_config(global_batch=12), str(tmp_path / 'a'))
  from srdd_jax.tools import convert_var
  from tests.conftest import reference_file
  vae = str(tmp_path / 'vae')
  assert convert_var.main(['--vae', reference_file('vqvae_ch32_256.npz'), '--prefix', 'vae/', '--out', vae]) == 0
  c = _config()
  c.tokenizer.checkpoint = vae  # Latent side 16; the smoke model's patch_nums end at 4.
  with pytest.raises(ConfigError, match=r'config.model.patch_nums=\(1, 2, 3, 4\) must end at .* 16'):
    train_mode.run(c, str(tmp_path / 'b'))
  c = _config()
  c.tokenizer.checkpoint = '/nope'
  with pytest.raises(ConfigError, match="config.tokenizer.checkpoint='/nope' does not exist"):
    train_mode.run(c, str(tmp_path / 'c'))


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path, monkeypatch):
  wd = str(tmp_path / 'nan')
  train_mode.run(_config(), wd, stop_after_steps=5)
  c = _config(steps=40)
  # A rate the up-front check refuses (tests/test_reliability.py): lifted here to reach the loop's own stop.
  monkeypatch.setattr(transformer_setup, 'MAX_PEAK_LR', float('inf'))
  c.optim.base_lr = 1e30
  # The record of what the checkpoints were made from refuses the changed rate and step count ...
  with pytest.raises(ConfigError, match=r'config.optim.base_lr: 0.01 -> 1e\+30\)'):
    train_mode.run(c, wd)
  # ... and without it (a workdir of an earlier version) the loop's own stop is reached.
  record = os.path.join(wd, 'training_inputs.json')
  os.remove(record)
  with pytest.raises(NonFiniteLoss, match=r'non-finite loss or gradient at step \d+'):
    train_mode.run(c, wd)
  os.remove(record)
  assert '5' in os.listdir(os.path.join(wd, 'checkpoints'))
  # A complete checkpoint that does not fit the config is an error, and stays where it is.
  c = _config(steps=10)
  c.train.ema_decay = 0.0  # The smoke run keeps an EMA: this state has none.
  from srdd_jax.train.checkpoint import CheckpointMismatch
  with pytest.raises(CheckpointMismatch, match='does not fit the state of the current config'):
    train_mode.run(c, wd)
  assert '5' in os.listdir(os.path.join(wd, 'checkpoints'))


# SIGTERM and Ctrl-C: tests/test_reliability.py::test_a_stopped_run_saves_and_exits_75.


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  wd = tmp_path_factory.mktemp('tok')
  c = _config()
  c.tokenize = {'flips': True, 'shard_size': 24, 'batch_size': 16}
  return str(wd / 'tokens'), tokenize.run(c, str(wd)), c


def test_tokenize_writes_a_manifest_and_the_tokens_of_each_example(cache):
  from srdd_jax.data import pipeline, token_cache
  from srdd_jax.tokenizer.api import Tokenizer
  directory, summary, c = cache
  m = json.load(open(os.path.join(directory, 'manifest.json')))
  assert (m['count'], m['num_shards'], m['flips'], tuple(m['patch_nums'])) == (64, 3, True, (1, 2, 3, 4))
  assert summary['examples'] == 64 and summary['shards_written'] == 3
  tok = load_tokenizer(c)
  vq, vae = tok.config, tok.params
  # The tokenizer's identity: its architecture and its weights (issue 47).
  assert m['tokenizer_hash'] == tok.identity()['hash'] and m['tokenizer']['weights'] == token_cache.params_hash(vae)
  tc = token_cache.TokenCache(directory, tokenizer_hash=m['tokenizer_hash'], patch_nums=(1, 2, 3, 4))
  src = pipeline.build_source({'source': 'synthetic', 'num_examples': 64, 'num_classes': 10}, 16, train=False)
  images = np.stack([src.load(i)[0] for i in (0, 37, 63)])
  ids = np.concatenate(jax.jit(Tokenizer(vq).img_to_idx)(vae, images), axis=1)
  flipped = np.concatenate(jax.jit(Tokenizer(vq).img_to_idx)(vae, images[:, :, ::-1]), axis=1)
  np.testing.assert_array_equal(tc.ids[[0, 37, 63], 0], ids)
  np.testing.assert_array_equal(tc.ids[[0, 37, 63], 1], flipped)
  np.testing.assert_array_equal(tc.labels, np.arange(64) % 10)
  # Same order as the image source: the examples of a step are the same in both.
  _, lab = tc.batch(0, 5, 16)
  np.testing.assert_array_equal(lab, src.batch(0, 5, 16)[1])


def test_a_truncated_shard_or_manifest_is_one_error_naming_the_file(cache, tmp_path):
  import shutil
  from srdd_jax.data.source import DataError
  from srdd_jax.data.token_cache import TokenCache
  out_dir, _, _ = cache
  for name, cut in (('shard_00000.npz', 100), ('manifest.json', 20)):
    bad = str(tmp_path / name)
    shutil.copytree(out_dir, bad)
    target = os.path.join(bad, name)
    assert os.path.exists(target), os.listdir(bad)
    data = open(target, 'rb').read()
    with open(target, 'wb') as f:
      f.write(data[:cut])
    with pytest.raises(DataError, match=rf'{name}.* is unreadable .*--mode=tokenize'):
      TokenCache(bad)
    assert open(target, 'rb').read() == data[:cut]  # Left as it was found.


def test_tokenize_never_overwrites_and_resumes_missing_shards(cache, tmp_path):
  import shutil
  directory, _, c = cache
  c2 = with_defaults(c)
  c2.tokenize.out_dir = directory
  with pytest.raises(ConfigError, match='already holds a complete token cache'):
    tokenize.run(c2, str(tmp_path))
  part = str(tmp_path / 'part')
  shutil.copytree(directory, part)
  os.remove(os.path.join(part, 'manifest.json'))  # As if killed while writing shard 1.
  os.remove(os.path.join(part, 'shard_00001.npz'))
  kept = os.stat(os.path.join(part, 'shard_00000.npz')).st_mtime_ns
  c2.tokenize.out_dir = part
  s = tokenize.run(c2, str(tmp_path))
  assert (s['shards_written'], s['shards_kept']) == (1, 2)
  assert os.stat(os.path.join(part, 'shard_00000.npz')).st_mtime_ns == kept
  for i in range(3):
    a, b = np.load(os.path.join(directory, f'shard_0000{i}.npz')), np.load(os.path.join(part, f'shard_0000{i}.npz'))
    np.testing.assert_array_equal(a['ids'], b['ids'])


def test_tokenize_max_examples_caches_the_first_n(cache, tmp_path):
  """config.tokenize.max_examples=N: the first N examples, the same tokens as the full cache's; a negative
  value is refused before anything is written."""
  from srdd_jax.data import token_cache
  directory, _, c = cache
  c2 = with_defaults(c)
  c2.tokenize.update(out_dir=str(tmp_path / 'first'), max_examples=30)
  s = tokenize.run(c2, str(tmp_path))
  m = json.load(open(os.path.join(str(tmp_path / 'first'), 'manifest.json')))
  assert (s['examples'], m['count'], m['source_examples'], m['num_shards']) == (30, 30, 64, 2)
  full = token_cache.TokenCache(directory, patch_nums=(1, 2, 3, 4))
  part = token_cache.TokenCache(str(tmp_path / 'first'), patch_nums=(1, 2, 3, 4))
  np.testing.assert_array_equal(part.ids, full.ids[:30])
  np.testing.assert_array_equal(part.labels, full.labels[:30])
  c2.tokenize.update(out_dir=str(tmp_path / 'bad'), max_examples=-1)
  with pytest.raises(ConfigError, match='config.tokenize.max_examples=-1'):
    tokenize.run(c2, str(tmp_path))
  assert not os.path.exists(str(tmp_path / 'bad'))


def test_heldout_loss_in_metrics(cache, tmp_path):
  """config.train.heldout_cache: metrics.jsonl gets heldout_loss every heldout_every steps and at the
  end, over the first heldout_examples examples; the last one is the exported model's held-out loss
  computed afresh. A cache of other scales is refused before any step."""
  from srdd_jax.convert import params_io
  from srdd_jax.data import token_cache
  from srdd_jax.train.distill import heldout_token_loss
  directory, _, _ = cache
  wd = str(tmp_path / 'h')
  c = _config(heldout_cache=directory, heldout_every=3, heldout_examples=20)  # 20 steps: straight's program.
  s = train_mode.run(c, wd)
  recs = [r for r in map(json.loads, open(os.path.join(wd, 'metrics.jsonl'))) if 'heldout_loss' in r]
  assert [r['step'] for r in recs] == [3, 6, 9, 12, 15, 18, 20] and all(r['heldout_examples'] == 20 for r in recs)
  assert recs[0]['heldout_loss'] != recs[-1]['heldout_loss'] and len(recs[-1]['heldout_loss_per_scale']) == 4
  vc, params = params_io.load_var(s['export'])
  tok = load_tokenizer(c)
  tc = token_cache.TokenCache(directory)
  r = heldout_token_loss(vc, params, tok.config, tok.params, tc.ids[:20, 0], tc.labels[:20], batch_size=8)
  np.testing.assert_allclose(recs[-1]['heldout_loss'], r['mean_loss'], rtol=1e-5)
  bad = _config(heldout_cache=directory)
  bad.model.patch_nums = (1, 2, 4)
  bad.tokenizer.update(checkpoint='')
  with pytest.raises(Exception, match='config.train.heldout_cache=.*patch_nums'):
    train_mode.run(bad, str(tmp_path / 'bad'))
  assert not os.path.exists(os.path.join(str(tmp_path / 'bad'), 'checkpoints', '1'))


def test_training_from_the_cache_equals_training_from_images(cache, straight, tmp_path):
  straight_wd, _ = straight
  c = _config()
  c.tokenize = {'out_dir': str(tmp_path / 'plain'), 'shard_size': 64, 'batch_size': 16}  # No flips.
  tokenize.run(c, str(tmp_path))
  c.data.token_cache = str(tmp_path / 'plain')
  wd = str(tmp_path / 'cached')
  train_mode.run(c, wd, stop_after_steps=3)
  got, want = _losses(wd), _losses(straight_wd)[:3]
  assert [s for s, _ in got] == [1, 2, 3]
  np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=1e-5)
  directory, _, _ = cache
  c = _config()
  c.data.token_cache = directory
  c.seed = 5  # The random smoke tokenizer depends on the seed: another tokenizer.
  with pytest.raises(ConfigError, match='config.data.token_cache=.* another tokenizer'):
    train_mode.run(c, str(tmp_path / 'other'))
  c.data.token_cache = str(tmp_path / 'nothing')
  with pytest.raises(ConfigError, match='config.data.token_cache=.* does not exist'):
    train_mode.run(c, str(tmp_path / 'other'))


def test_one_progress_line_per_log_step_with_eta(tmp_path, caplog):
  caplog.set_level('INFO')
  train_mode.run(_config(log_every=1, checkpoint_every=100), str(tmp_path), stop_after_steps=3)
  lines = [r.getMessage() for r in caplog.records]
  progress = [m for m in lines if ' step ' in m and '/20 ' in m]
  assert [m.split(' step ')[1].split('/')[0] for m in progress] == ['1', '2', '3'], progress
  assert all('loss ' in m and 'acc ' in m and 'steps/s ETA ' in m for m in progress), progress
  # clu's logging writer would print each record again ("[1] loss=...").
  assert not [m for m in lines if m.startswith('[') and 'loss=' in m]
  records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in records] == [1, 2, 3] and all('eta_s' in r and 'tokens_per_s' in r for r in records)


def test_training_without_tensorflow_writes_metrics_and_no_events(tmp_path, caplog, monkeypatch):
  """clu's TensorBoard writer imports TensorFlow; a machine without it (the GPU images) still trains,
  with metrics.jsonl and a warning instead of event files."""
  import sys  # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(sys.modules, 'clu.metric_writers', None)  # Its import fails, as without TensorFlow.
  caplog.set_level('WARNING')
  train_mode.run(_config(log_every=1, checkpoint_every=100), str(tmp_path), stop_after_steps=2)
  assert [json.loads(l)['step'] for l in open(tmp_path / 'metrics.jsonl')] == [1, 2]
  assert not [f for f in os.listdir(tmp_path) if f.startswith('events.out')]
  assert any("no TensorBoard events" in r.getMessage() for r in caplog.records)


def test_a_fine_tune_continues_its_start_models_data_stream_and_records_it(tmp_path, monkeypatch):
  """A start model of 4 steps of 8 (32 of the smoke set's 64 examples), then a fine-tune of 4 more from its
  export, cut after 2 steps and resumed: together they draw every example exactly once (the fine-tune
  used to start at step 0 again: the start model's 32 examples twice, the other 32 never). Both exports
  record their step, data stream and EMA; the fine-tune's its start model and step, and its own step
  counter starts at 0, so its EMA (warmed up again) keeps 0.14% of the start model."""
  from srdd_jax.convert import params_io
  from srdd_jax.data.pipeline import SyntheticSource
  from srdd_jax.train.step import ema_start_weight
  drawn = []
  real = SyntheticSource.batch

  def spy(self, seed, step, global_batch, *args, **kwargs):
    drawn.append((int(seed), int(step)))
    return real(self, seed, step, global_batch, *args, **kwargs)

  monkeypatch.setattr(SyntheticSource, 'batch', spy)
  start_wd, tune_wd = str(tmp_path / 'start'), str(tmp_path / 'tune')
  start = train_mode.run(_config(steps=4, global_batch=8), start_wd)
  start_draws, drawn[:] = list(drawn), []
  c = _config(steps=4, global_batch=8)
  c.train.init_from = start['export']
  first = train_mode.run(c, tune_wd, stop_after_steps=2)
  assert first['start_step'] == 0 and first['end_step'] == 2
  tune = train_mode.run(c, tune_wd)
  assert tune['start_step'] == 2 and tune['end_step'] == 4
  # The iterators draw batches in order (a prefetch may draw past the last step): the trained ones first.
  assert start_draws[:4] == [(0, s) for s in range(4)]
  tune_draws = sorted(set(drawn))
  assert [d for d in tune_draws if d[1] < 8] == [(0, s) for s in range(4, 8)], drawn
  examples = []
  for seed, step in start_draws[:4] + [(0, s) for s in range(4, 8)]:
    for p in range(8):
      epoch, k = divmod(step * 8 + p, 64)
      examples.append(int(np.random.default_rng([seed, epoch]).permutation(64)[k]))
  assert sorted(examples) == list(range(64))  # One epoch, every example once.

  rec = params_io.model_meta(start['export'])['train']
  assert (rec['step'], rec['total_steps'], rec['init_from']) == (4, 4, None)
  assert {k: rec['data'][k] for k in ('seed', 'global_batch', 'first_step', 'next_step', 'next_example',
                                      'num_examples')} == {'seed': 0, 'global_batch': 8, 'first_step': 0,
                                                           'next_step': 4, 'next_example': 32, 'num_examples': 64}
  rec = params_io.model_meta(tune['export'])['train']
  assert rec['init_from'] == {'source': os.path.abspath(start['export']), 'step': 4, 'total_steps': 4}
  assert (rec['step'], rec['total_steps'], rec['data']['first_step'], rec['data']['next_example']) == (4, 8, 4, 64)
  assert rec['ema'] == {'decay': 0.999, 'warmup': 10, 'start_weight': ema_start_weight(0.999, 4)}
  assert rec['ema']['start_weight'] < 0.01
  assert tune['init_from'] == rec['init_from'] and tune['data_stream']['first_step'] == 4


def test_a_fine_tune_stream_on_other_data_or_batch(tmp_path):
  """The stream's start from the start model's record: a batch that does not divide the examples it drew
  skips fewer than a batch; another data set size, or an export without a record (convert_var's), starts
  the run's own stream at step 0."""
  from srdd_jax.train.export import data_stream
  d = tmp_path / 'start'
  d.mkdir()
  (d / 'model.json').write_text(json.dumps({'kind': 'var', 'train': {
      'step': 4, 'total_steps': 10, 'data': {'num_examples': 64, 'seed': 3, 'next_example': 80}}}))
  s = data_stream(str(d), 64, 24, seed=0)
  assert (s['seed'], s['first_step'], s['skipped_examples']) == (3, 4, 16)  # 96 >= 80, 96 - 80 skipped.
  assert s['init_from'] == {'source': str(d), 'step': 4, 'total_steps': 10}
  s = data_stream(str(d), 63, 8, seed=5)
  assert (s['seed'], s['first_step'], s['skipped_examples'], s['init_from']['step']) == (5, 0, 0, 4)
  (d / 'model.json').write_text(json.dumps({'kind': 'var'}))
  s = data_stream(str(d), 64, 8, seed=5)
  assert (s['seed'], s['first_step'], s['init_from']) == (5, 0, {'source': str(d), 'step': None, 'total_steps': None})
  assert data_stream('', 64, 8, seed=2) == {'seed': 2, 'first_step': 0, 'init_from': None, 'skipped_examples': 0}
