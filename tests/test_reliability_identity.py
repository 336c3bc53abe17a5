"""Issue 47 line 1: what a result was made from is fully recorded, and a mismatch is refused naming it.

The tokenizer's identity covers its architecture (model.json) and its weights: a copy of a tokenizer whose
model.json says quant_resi 0.1 instead of 0.5 has the same weights and gives other ids. Token caches,
exports and samples record the identities they were made from; a cache is never completed or read with
another tokenizer, an export is never sampled or fine-tuned with another, and the units of a scaling sweep
record their inputs as --mode=all's stages and the study's units do, under the workdir's lock.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from srdd_jax import main
from srdd_jax.config import ConfigError
from srdd_jax.convert import params_io
from srdd_jax.convert.loading import load_tokenizer, tokenizer_identity
from srdd_jax.data import token_cache
from srdd_jax.data.source import DataError
from srdd_jax.modes import distill, scaling, tokenize
from srdd_jax.modes import train as train_mode
from srdd_jax.parallel.workdir import LOCK_NAME, Units, WorkdirLock
from srdd_jax.tokenizer.api import Tokenizer
from tests.conftest import save_tiny_models, smoke_config, xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _edited_copy(source: str, target: str, **architecture) -> str:
  """A copy of the model directory `source` whose model.json's config differs by `architecture`."""
  shutil.copytree(source, target)
  meta = json.load(open(os.path.join(target, 'model.json')))
  meta['config'].update(architecture)
  with open(os.path.join(target, 'model.json'), 'w') as f:
    json.dump(meta, f)
  return target


@pytest.fixture(scope='module')
def tokenizers(tmp_path_factory):
  """The tiny tokenizer (16 px, scales 1..4), its copy with quant_resi 0.1 (same weights), and a trained
  transformer export of it (smoke config, 2 steps)."""
  root = tmp_path_factory.mktemp('identity')
  var, vae = save_tiny_models(str(root))
  other = _edited_copy(vae, str(root / 'vae_quant_resi_0.1'), quant_resi=0.1)
  c = smoke_config(steps=2, checkpoint_every=5)
  c.tokenizer.checkpoint = vae
  s = train_mode.run(c, str(root / 'run'))
  return {'vae': vae, 'other': other, 'var': var, 'export': s['export'], 'root': root}


def _config(tokenizer: str, **tokenize_settings):
  c = smoke_config(steps=2, checkpoint_every=5)
  c.tokenizer.checkpoint = tokenizer
  c.tokenize = {'shard_size': 24, 'batch_size': 16, **tokenize_settings}
  return c


def test_the_identity_covers_the_architecture_and_the_carried_hash_checks_it(tokenizers):
  """Issue 47: the copy with quant_resi 0.5 -> 0.1 passed `params_sha256`, whose hash covered the weights
  only; its ids differ from the original's for most tokens."""
  a, b = (load_tokenizer(_config(t)) for t in (tokenizers['vae'], tokenizers['other']))
  ia, ib = a.identity(), b.identity()
  assert ia['weights'] == ib['weights'] == token_cache.params_hash(a.params)
  assert ia['hash'] != ib['hash'] and ib['architecture']['quant_resi'] == 0.1
  assert tokenizer_identity(a.config, a.params)['hash'] == ia['hash']  # Deterministic, from the two parts.
  # The scales are not part of it: each user quantizes at its own.
  assert tokenizer_identity(dataclasses.replace(a.config, patch_nums=(1, 2, 4)), a.params)['hash'] == ia['hash']
  # Why it matters: the ids of the same images differ.
  images = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
  ids = [np.concatenate(Tokenizer(t.config).img_to_idx(t.params, images), axis=1) for t in (a, b)]
  assert (ids[0] != ids[1]).mean() > 0.2
  # config.tokenizer.params_sha256 holds the identity's hash: the original passes, the copy is refused.
  c = _config(tokenizers['other'])
  c.tokenizer.params_sha256 = ia['hash']
  with pytest.raises(ConfigError, match=r'holds a tokenizer of hash [0-9a-f]{16}\.\.\. \(architecture and weights\), '
                                        r'not config.tokenizer.params_sha256='):
    load_tokenizer(c)
  c.tokenizer.checkpoint = tokenizers['vae']
  assert load_tokenizer(c).identity()['hash'] == ia['hash']


def test_a_cache_is_never_completed_or_read_by_another_tokenizer(tokenizers, tmp_path):
  """Issue 47: after its manifest was removed, a cache was completed by the quant_resi copy ("shards_kept
  1, written 1", exit 0): the shards' writers recorded the weights' hash only."""
  c = _config(tokenizers['vae'], out_dir=str(tmp_path / 'tokens'))
  tokenize.run(c, str(tmp_path))
  m = json.load(open(tmp_path / 'tokens' / 'manifest.json'))
  ia = load_tokenizer(c).identity()
  assert m['format'] == 3 and m['tokenizer_hash'] == ia['hash']
  assert m['tokenizer']['weights'] == ia['weights'] and m['tokenizer']['architecture'] == ia['architecture']
  os.remove(tmp_path / 'tokens' / 'manifest.json')
  os.remove(tmp_path / 'tokens' / 'shard_00002.npz')
  kept = (tmp_path / 'tokens' / 'shard_00000.npz').read_bytes()
  other = _config(tokenizers['other'], out_dir=str(tmp_path / 'tokens'))
  with pytest.raises(DataError, match=r"shard_00000.npz is left from an earlier tokenize run .* another tokenizer"):
    tokenize.run(other, str(tmp_path))
  assert (tmp_path / 'tokens' / 'shard_00000.npz').read_bytes() == kept
  assert not (tmp_path / 'tokens' / 'manifest.json').exists()
  s = tokenize.run(c, str(tmp_path))  # Its own tokenizer completes it.
  assert (s['shards_written'], s['shards_kept']) == (1, 2)
  # Read with the copy: refused, naming both tokenizers and what differs.
  ib = load_tokenizer(other).identity()
  with pytest.raises(DataError, match=r"was written by another tokenizer .* than config.tokenizer.checkpoint "
                                      r"\(checkpoint .*vae_quant_resi_0.1, hash [0-9a-f]{12}\): architecture "
                                      r"quant_resi: 0.5 -> 0.1"):
    token_cache.TokenCache(str(tmp_path / 'tokens'), tokenizer=ib)
  token_cache.TokenCache(str(tmp_path / 'tokens'), tokenizer=ia)
  # ... and so is training on it: exit 2, one line.
  argv = ['srdd_jax.main', '--config=configs/smoke.py', f'--workdir={tmp_path / "run"}', '--config.mesh.data=8',
          f'--config.tokenizer.checkpoint={tokenizers["other"]}', f'--config.data.token_cache={tmp_path / "tokens"}']
  assert main.run(argv) == 2
  # A cache of an earlier version (format 2: the weights' hash alone) is read by the tokenizer of those
  # weights, with a warning that its architecture is unchecked; other weights are refused.
  m2 = dict(m, format=2, tokenizer_hash=ia['weights'])
  del m2['tokenizer']
  with open(tmp_path / 'tokens' / 'manifest.json', 'w') as f:
    json.dump(m2, f)
  for i in range(m['num_shards']):
    path = tmp_path / 'tokens' / f'shard_{i:05d}.npz'
    with np.load(path) as z:
      arrays = {k: z[k] for k in z.files}
    arrays['writer'] = np.array(json.dumps(dict(json.loads(str(arrays['writer'])), tokenizer_hash=ia['weights'])))
    np.savez(path, **arrays)
  token_cache.TokenCache(str(tmp_path / 'tokens'), tokenizer=ia)
  with pytest.raises(DataError, match=r'was written by another tokenizer .*: weights'):
    token_cache.TokenCache(str(tmp_path / 'tokens'), tokenizer=dict(ia, weights='0' * 64))


def test_exports_record_their_tokenizer_and_are_never_used_with_another(tokenizers, tmp_path, capsys):
  """Issue 47: exports did not record their tokenizer, so sampling with another went unnoticed. The export's
  train record holds the tokenizer's identity; sampling, a fine-tune (init_from) and a distillation
  (teacher) with another tokenizer are refused naming both; the samples record what they were made from."""
  rec = params_io.model_meta(tokenizers['export'])['train']['tokenizer']
  ia = load_tokenizer(_config(tokenizers['vae'])).identity()
  assert (rec['hash'], rec['weights'], rec['architecture']) == (ia['hash'], ia['weights'], ia['architecture'])
  assert rec['source'] == f'checkpoint {tokenizers["vae"]}'
  sample = ['srdd_jax.main', '--config=configs/sample.py', '--mode=sample', f'--config.model.checkpoint={tokenizers["export"]}',
            '--config.sample.classes=0,1', '--config.sample.num_per_class=4', '--config.sample.batch_size=8',
            '--config.sampler.top_k=0', '--config.sampler.top_p=0']
  assert main.run(sample + [f'--workdir={tmp_path / "other"}', f'--config.tokenizer.checkpoint={tokenizers["other"]}']) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error: ')]
  assert len(err) == 1, err
  assert (f"config.model.checkpoint='{tokenizers['export']}' was trained with the tokenizer checkpoint "
          f"{tokenizers['vae']} (hash {ia['hash'][:12]}), config.tokenizer.checkpoint gives another, checkpoint "
          f"{tokenizers['other']} (hash ") in err[0] and 'architecture quant_resi: 0.5 -> 0.1' in err[0], err
  assert not (tmp_path / 'other' / 'samples').exists()
  # Its own tokenizer (or a copy of it, elsewhere: the same identity) samples, and the samples say from what.
  same = shutil.copytree(tokenizers['vae'], tmp_path / 'vae_copy')
  assert main.run(sample + [f'--workdir={tmp_path / "own"}', f'--config.tokenizer.checkpoint={same}']) == 0
  made_from = json.load(open(tmp_path / 'own' / 'samples' / 'summary.json'))['made_from']
  assert made_from['model'] == params_io.model_identity(tokenizers['export']) and made_from['seed'] == 0
  assert made_from['tokenizer'] == params_io.model_identity(str(same))
  # A fine-tune of it, and a student of it, with the other tokenizer: refused before anything is built.
  c = _config(tokenizers['other'])
  c.train.init_from = tokenizers['export']
  with pytest.raises(ConfigError, match=r"config.train.init_from='.*' was trained with the tokenizer .*quant_resi"):
    train_mode.task(c, str(tmp_path / 'tune'))
  c = _config(tokenizers['other'])
  c.distill.update(teacher=tokenizers['export'], patch_nums='1,2,4')
  with pytest.raises(ConfigError, match=r"config.distill.teacher='.*' was trained with the tokenizer .*quant_resi"):
    distill.task(c, str(tmp_path / 'student'))


def test_plain_training_checkpoints_record_their_inputs(tokenizers, tmp_path, capsys):
  """Issue 47 line 1: --mode=train's checkpoints recorded nothing, so a resume with another tokenizer or
  another schedule went on from them unnoticed. WORKDIR/training_inputs.json records what they were made
  from (one mechanism with --mode=all's stages, parallel/workdir.Units); a resume from other inputs is exit
  2 naming the change, with nothing written, and settings a resumed run may change (logging, saving, the
  CPU's matmul precision) are not inputs."""
  wd = str(tmp_path / 'run')
  c = _config(tokenizers['vae'])
  assert train_mode.run(c, wd, stop_after_steps=1)['end_step'] == 1
  record = json.load(open(os.path.join(wd, 'training_inputs.json')))['checkpoints']
  ia = load_tokenizer(c).identity()
  assert record['tokenizer'] == ia['hash'] and record['config.optim']['base_lr'] == c.optim.base_lr
  assert not {'log_every', 'steps'} & set(record['config.train']) and 'cpu_matmul' not in record['config.model']
  before = {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(wd) for f in fs}
  cmd = ['srdd_jax.main', '--config=configs/smoke.py', '--mode=train', f'--workdir={wd}',
         '--config.train.steps=2', '--config.train.checkpoint_every=5']
  assert main.run(cmd + [f'--config.tokenizer.checkpoint={tokenizers["other"]}']) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error: ')]
  assert len(err) == 1 and "checkpoints was made from other inputs" in err[0], err
  assert f"tokenizer: '{ia['hash']}' -> '" in err[0], err
  after = {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(wd) for f in fs}
  assert after == before
  # Bookkeeping and the CPU's matmul precision may change; the run resumes and finishes.
  c.train.log_every, c.train.keep_checkpoints, c.model.cpu_matmul = 7, 2, 'float32'
  s = train_mode.run(c, wd)
  assert (s['start_step'], s['end_step']) == (1, 2)


def test_a_record_of_an_earlier_version_is_upgraded_not_refused(tmp_path):
  """The identities this version records have more keys (model.json's hash, the parameter files): a unit
  an earlier version recorded without them, equal on every key it has, is kept and recorded anew; one
  that differs on a key it has is refused as before."""
  units = Units(str(tmp_path), inputs_file='inputs.json')
  old = {'model': {'path': '/m', 'created': 'then', 'num_params': 5}, 'seed': 0}
  new = {'model': {**old['model'], 'model_json_sha256': 'ab', 'params_files': 'cd'}, 'seed': 0}
  with open(tmp_path / 'inputs.json', 'w') as f:
    json.dump({'train': old}, f)
  assert units.timed('train', lambda: {'ok': 1}, inputs=new) == {'ok': 1}
  assert json.load(open(tmp_path / 'inputs.json'))['train'] == new
  moved = {'model': {**new['model'], 'created': 'now'}, 'seed': 0}
  with pytest.raises(ConfigError, match=r"made from other inputs .*model.created: 'then' -> 'now'"):
    units.timed('train', lambda: {'ok': 1}, inputs=moved)
  # A changed key beside an added one is a change, not an upgrade.
  with open(tmp_path / 'inputs.json', 'w') as f:
    json.dump({'train': {**old, 'seed': 1}}, f)
  with pytest.raises(ConfigError, match=r'seed: 1 -> 0'):
    units.timed('train', lambda: {'ok': 1}, inputs=new)


def _scaling_config(tokenizer: str):
  from configs import tokenizer_smoke  # pylint: disable=import-outside-toplevel
  c = tokenizer_smoke.get_config()
  c.tokenizer.checkpoint = tokenizer
  c.model.update(num_classes=10, drop_path_rate=0.0, scan=False)
  c.train.update(global_batch=16, steps=4, log_every=2, checkpoint_every=4, keep_checkpoints=1)
  c.optim.update(warmup_steps=1)
  c.tokenize.update(batch_size=64)
  return c


def test_scaling_units_record_their_inputs_and_hold_the_lock(small_tokenizer, tmp_path):
  """Issue 47: `scaling run` took no workdir lock (two runs 12 s apart trained the same point, 61 metric
  lines for 30 steps, both exit 0), and its units recorded nothing of what they were made from. Now a
  point, its checkpoints and the shared stages record their inputs (a change is exit 2 naming it), ROOT
  and each point's workdir are held, and a second sweep on the same root is refused before it runs."""
  root = str(tmp_path / 'sweep')
  c = _scaling_config(small_tokenizer)
  points = scaling.sweep((1,), ('markov',), (4,), (0,), width_per_depth=32)
  name = points[0].name
  done = scaling.run_points(c, root, points, heldout_examples=32)
  records = json.load(open(os.path.join(root, 'inputs.json')))
  assert {f'points/{name}', f'points/{name}/checkpoints', 'token cache train_all', 'token cache heldout'} <= set(
      records)
  point = records[f'points/{name}']
  assert point['tokenizer'] == params_io.model_identity(small_tokenizer)
  assert point['config.optim']['base_lr'] == float(c.optim.base_lr) and point['point']['steps'] == 4
  lines = open(os.path.join(root, 'points', name, 'metrics.jsonl')).read().splitlines()
  assert scaling.run_points(c, root, points, heldout_examples=32) == done  # The same inputs: kept.
  c.optim.base_lr = float(c.optim.base_lr) * 2  # Another setting of a finished point: refused, untouched.
  with pytest.raises(ConfigError, match=rf"points/{name}/done.json was made from other inputs .*config.optim.base_lr"):
    scaling.run_points(c, root, points, heldout_examples=32)
  assert open(os.path.join(root, 'points', name, 'metrics.jsonl')).read().splitlines() == lines
  # A point's workdir held by another run (a launched `srdd_jax.main` of that point): refused.
  c.optim.base_lr = float(c.optim.base_lr) / 2
  more = scaling.sweep((1,), ('markov',), (4, 6), (0,), width_per_depth=32)
  busy = os.path.join(root, 'points', more[1].name)
  os.makedirs(busy)
  with WorkdirLock(busy):
    with pytest.raises(ConfigError, match=f'workdir {busy!r} is in use by process {os.getpid()}'):
      scaling.run_points(c, root, more, heldout_examples=32)
  assert not os.path.exists(os.path.join(busy, 'metrics.jsonl'))
  # A second sweep on a root held by a running one: exit 2, one line, nothing trained.
  env = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS='cpu')
  with WorkdirLock(root):
    r = subprocess.run([sys.executable, '-m', 'srdd_jax.scaling', 'run', '--config=configs/tokenizer_smoke.py',
                        f'--workdir={root}', '--depths=1', '--masks=markov', '--steps=4,6', '--width_per_depth=32',
                        f'--config.tokenizer.checkpoint={small_tokenizer}', '--config.model.num_classes=10',
                        '--config.train.global_batch=16', '--heldout_examples=32'],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  errors = [line for line in r.stderr.splitlines() if line.startswith('error: ')]
  assert r.returncode == 2 and 'Traceback' not in r.stderr and len(errors) == 1, r.stderr[-3000:]
  assert f'workdir {root!r} is in use by process {os.getpid()}' in errors[0]
  assert not os.path.exists(os.path.join(busy, 'metrics.jsonl')) and not os.path.exists(os.path.join(root, LOCK_NAME))
