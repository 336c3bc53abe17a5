"""Proxy metrics: the project's own classifier, its cache, fd_<classifier> and class consistency.

One small classifier is trained for the whole file (sklearn digits at 8 px, 3 epochs: seconds); the
Fashion-MNIST classifier itself is trained by the CLI, not here (its accuracy is in the report).
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from srdd_jax.evaluation import classifier as C
from srdd_jax.evaluation import proxy
from srdd_jax.tools import train_proxy_classifier

DATA = {'source': 'digits', 'resize_ratio': 1.0, 'flip': False}
SIZE = 8
KW = {'epochs': 3, 'batch_size': 64}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp('proxy_cache'))
  clf = C.train_or_load(DATA, SIZE, cache, **KW)
  real, labels = C.held_out_images(clf, DATA)
  return cache, clf, real, labels


def _uniform_noise(shape, seed=0):
  return np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# The metrics
# ---------------------------------------------------------------------------------------------------

def test_held_out_set_against_itself_gives_zero(trained):
  _, clf, real, _ = trained
  out = proxy.proxy_metrics(clf, real, real)
  assert set(out) == {'fd_cnn_digits_8px', 'classifier_test_accuracy'}  # No labels: no consistency.
  assert abs(out['fd_cnn_digits_8px']) < 1e-6
  # uint8 and the same images as float in [0, 1] are one input.
  assert abs(proxy.proxy_metrics(clf, real, real.astype(np.float32) / 255.0)['fd_cnn_digits_8px']) < 1e-4


def test_noise_is_far_from_the_held_out_set(trained):
  _, clf, real, _ = trained
  h = len(real) // 2
  halves = proxy.proxy_metrics(clf, real[:h], real[h:])['fd_cnn_digits_8px']
  noise = proxy.proxy_metrics(clf, real, _uniform_noise(real.shape))['fd_cnn_digits_8px']
  assert 0 < halves and noise > 10 * halves, (halves, noise)
  # Statistics of the real images computed once give the same value.
  stats = proxy.feature_statistics(clf, real)
  again = proxy.proxy_metrics(clf, None, _uniform_noise(real.shape), real_stats=stats)['fd_cnn_digits_8px']
  assert again == noise


def test_consistency_of_real_images_is_the_classifier_accuracy(trained):
  _, clf, real, labels = trained
  out = proxy.proxy_metrics(clf, real, real, labels)
  assert out['class_consistency'] == clf.accuracy == out['classifier_test_accuracy']
  assert clf.accuracy == clf.info['test_correct'] / clf.info['num_test_examples']
  assert clf.info['num_test_examples'] == len(real) == 297  # digits' test split, held out.
  assert clf.accuracy > 0.5  # Chance is 0.1: the network did learn.
  # Wrong labels (each shifted by one class) agree exactly where the classifier predicted that class.
  shifted = (labels + 1) % 10
  assert proxy.class_consistency(clf, real, shifted) == np.mean(clf.predict(real) == shifted)


def test_features_are_penultimate_and_independent_of_batching(trained):
  _, clf, real, _ = trained
  f = clf.features(real)
  assert f.shape == (len(real), 128) and f.dtype == np.float32
  assert np.all(f >= 0) and np.std(f) > 0  # ReLU features that vary.
  # batch 7 pads the last of 43 batches; features must not depend on the padding or the batch.
  np.testing.assert_allclose(clf.features(real, batch_size=7), f, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Training and cache
# ---------------------------------------------------------------------------------------------------

def test_training_is_deterministic_given_the_seed(trained):
  _, clf, _, _ = trained
  request = C.make_request(DATA, SIZE, **KW)
  again = C.train(request, DATA)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, clf.params)
  assert again.accuracy == clf.accuracy


def test_cache_is_reused_and_another_request_is_not(trained, monkeypatch):
  cache, clf, real, _ = trained
  assert not clf.from_cache
  entry = os.path.join(cache, clf.key)
  assert sorted(os.listdir(cache)) == [clf.key]  # No temporary directory left behind.
  assert sorted(os.listdir(entry)) == [C.INFO_FILE, C.PARAMS_FILE]

  def no_training(*args, **kwargs):
    raise AssertionError('trained again')
  monkeypatch.setattr(C, 'train', no_training)
  cached = C.train_or_load(DATA, SIZE, cache, **KW)
  assert cached.from_cache and cached.key == clf.key and cached.accuracy == clf.accuracy
  jax.tree_util.tree_map(np.testing.assert_array_equal, cached.params, clf.params)
  np.testing.assert_array_equal(cached.features(real), clf.features(real))
  # Where the data lives is not what it is: another idx_dir is the same classifier.
  assert C.train_or_load({**DATA, 'idx_dir': '/elsewhere'}, SIZE, cache, **KW).from_cache
  # Another seed, epoch count, image size or data option is another classifier: it trains.
  for data, size, kw in [(DATA, SIZE, {**KW, 'seed': 1}), (DATA, SIZE, {**KW, 'epochs': 4}),
                         (DATA, 16, KW), ({**DATA, 'flip': True}, SIZE, KW)]:
    with pytest.raises(AssertionError, match='trained again'):
      C.train_or_load(data, size, cache, **kw)


def test_a_cache_entry_that_does_not_match_is_an_error(trained, tmp_path):
  cache, clf, _, _ = trained
  shutil.copytree(os.path.join(cache, clf.key), tmp_path / clf.key)
  info_path = tmp_path / clf.key / C.INFO_FILE
  info = json.loads(info_path.read_text())
  info['request']['training']['epochs'] = 99
  info_path.write_text(json.dumps(info))
  with pytest.raises(C.CacheMismatch, match=r"another classifier.*\['training'\]"):
    C.train_or_load(DATA, SIZE, str(tmp_path), **KW)
  info['request']['training']['epochs'] = KW['epochs']
  info_path.write_text(json.dumps(info))
  params_path = tmp_path / clf.key / C.PARAMS_FILE
  params_path.write_bytes(params_path.read_bytes()[:-1] + b'\0')
  with pytest.raises(C.CacheMismatch, match='SHA-256'):
    C.train_or_load(DATA, SIZE, str(tmp_path), **KW)


@pytest.mark.parametrize('text, what', [('[1, 2]', 'it holds an array, not a JSON object'),
                                         ('"cnn"', 'it holds a string, not a JSON object'),
                                         ('{"kind": ', 'not JSON: ')], ids=['array', 'string', 'cut short'])
def test_a_cache_entry_whose_description_is_not_an_object_is_an_error(tmp_path, text, what):
  """Valid JSON of another shape was an AttributeError traceback ('list' object has no attribute 'get'),
  JSON cut short a JSONDecodeError without the file: each is named, as the other broken entries are."""
  _, key = C.cache_key(C.make_request(DATA, SIZE, **KW))
  (tmp_path / key).mkdir()
  (tmp_path / key / C.INFO_FILE).write_text(text)
  (tmp_path / key / C.PARAMS_FILE).write_bytes(b'')
  info_path = str(tmp_path / key / C.INFO_FILE)
  with pytest.raises(C.CacheMismatch) as e:
    C.train_or_load(DATA, SIZE, str(tmp_path), **KW)
  assert str(e.value).startswith(f'{info_path} is not a proxy classifier description ({what}')
  assert f'delete {tmp_path / key} to retrain' in str(e.value)


def test_request_names_and_defaults():
  key = C.cache_key(C.make_request({'source': 'digits'}, 8))
  assert key == C.cache_key(C.make_request({'source': 'digits', 'resize_ratio': 1.125, 'flip': True}, 8))
  assert key[0] == 'cnn_digits' and key[1].startswith('cnn_digits_8px_')
  assert C.dataset_name({'source': 'tfds', 'name': 'sun397/tfds:4.*'}) == 'sun397'
  assert C.dataset_name({'source': 'folder', 'path': '/data/AFHQ-Cats/'}) == 'afhq_cats'
  with pytest.raises(ValueError, match='config.data.source'):
    C.make_request({'source': 'mnist'}, 8)


def test_sources_without_splits_hold_out_a_tenth():
  data = {'source': 'synthetic', 'num_examples': 50}
  train_x, train_y, classes = C.load_split(data, 8, 'train')
  test_x, test_y, _ = C.load_split(data, 8, 'test')
  assert (len(train_x), len(test_x), classes) == (45, 5, 10)
  assert train_x.dtype == np.uint8 and train_x.shape[1:] == (8, 8, 3)
  every = np.concatenate([train_x, test_x]).reshape(50, -1)
  assert len(np.unique(every, axis=0)) == len(np.unique(every[:45], axis=0)) + len(np.unique(every[45:], axis=0))


# ---------------------------------------------------------------------------------------------------
# Errors and CLI
# ---------------------------------------------------------------------------------------------------

def test_bad_inputs_are_clear_errors(trained):
  _, clf, real, labels = trained
  with pytest.raises(ValueError, match=r'samples: .* 8x8'):
    proxy.proxy_metrics(clf, real, np.zeros((4, 16, 16, 3), np.uint8))
  with pytest.raises(ValueError, match=r'samples: .* 8x8'):
    proxy.proxy_metrics(clf, real, np.zeros((4, 3, 8, 8), np.uint8))  # NCHW.
  with pytest.raises(ValueError, match=r'samples: .* 8x8'):
    proxy.proxy_metrics(clf, real, np.zeros((4, 8, 8, 1), np.uint8))
  with pytest.raises(ValueError, match=r'real images: float images must lie in \[0, 1\]'):
    proxy.proxy_metrics(clf, real.astype(np.float32) / 127.5 - 1.0, real)
  with pytest.raises(ValueError, match='sample labels: labels must lie in'):
    proxy.proxy_metrics(clf, real, real, labels + 10)
  with pytest.raises(ValueError, match='sample labels: expected 297 integer'):
    proxy.proxy_metrics(clf, real, real, labels[:5])
  with pytest.raises(ValueError, match='at least 2'):
    proxy.proxy_metrics(clf, real, real[:1])


def test_cli_reads_the_cache_and_reports(trained, capsys):
  cache, clf, _, _ = trained
  rc = train_proxy_classifier.main(['--data=digits', '--image_size=8', '--resize_ratio=1.0', '--set',
                                    'flip=false', '--epochs=3', f'--out={cache}'])
  out = capsys.readouterr().out
  assert rc == 0
  assert f'proxy classifier {clf.key} (read from the cache)' in out
  assert f'test accuracy {clf.accuracy:.4f} ({clf.info["test_correct"]}/297' in out
  assert 'fd_cnn_digits_8px' in out and 'FID' not in out
  assert train_proxy_classifier.main(['--data=mnist', '--image_size=8', f'--out={cache}']) == 2
  assert 'config.data.source' in capsys.readouterr().err


def test_real_features_are_computed_once_per_classifier_and_split(tmp_path, monkeypatch):
  """The evaluations of a workdir compute the real images' features once per classifier, split and
  count: a second scorer (a second `--mode=eval`) reads them from the classifier's cache entry without
  loading an image, and gets the same numbers; another split, count or classifier computes its own; a
  file that describes another classifier is computed again."""
  import ml_collections
  from srdd_jax.evaluation import protocol
  cfg = ml_collections.ConfigDict({'seed': 0, 'data': DATA})
  o = {'proxy_epochs': 3, 'proxy_examples': 150, 'samples': ''}
  samples, labels, _ = C.load_split(DATA, SIZE, 'train')
  samples, labels = samples[:40], labels[:40]
  computed = []
  real_features = proxy.features

  def counted(clf, images, **kwargs):
    if 'real images' in kwargs.get('what', ''):
      computed.append((clf.key, kwargs['what'], len(images)))
    return real_features(clf, images, **kwargs)

  monkeypatch.setattr(protocol.proxy, 'features', counted)
  wd = str(tmp_path)
  first = protocol.ProxyScorer(cfg, o, wd)(samples, labels)
  key = first['proxy_classifier']
  assert computed == [(key, 'test real images', 150)] and first['proxy_real_examples'] == 150
  entry = os.path.join(wd, 'proxy_classifier', key)
  assert 'real_features_test_150.npz' in os.listdir(entry)

  load_split = C.load_split
  monkeypatch.setattr(C, 'load_split', lambda *a, **k: pytest.fail('real images loaded again'))
  scorer = protocol.ProxyScorer(cfg, o, wd)
  assert scorer(samples, labels) == first and len(computed) == 1
  monkeypatch.setattr(C, 'load_split', load_split)
  scorer(samples, labels, split='train')
  protocol.ProxyScorer(cfg, {**o, 'proxy_examples': 100}, wd)(samples, labels)
  other = protocol.ProxyScorer(cfg, o, wd, seed=1)(samples, labels)
  assert other['proxy_classifier'] != key
  assert computed[1:] == [(key, 'train real images', 150), (key, 'test real images', 100),
                          (other['proxy_classifier'], 'test real images', 150)]
  # A file whose record names another classifier (copied from elsewhere, say) is not believed.
  path = os.path.join(entry, 'real_features_test_150.npz')
  with np.load(path) as z:
    feats, identity = z['features'], json.loads(str(z['identity']))
  np.savez(path, features=feats, identity=np.asarray(json.dumps({**identity, 'params_sha256': 'x' * 64})))
  assert protocol.ProxyScorer(cfg, o, wd)(samples, labels) == first
  assert computed[-1] == (key, 'test real images', 150) and len(computed) == 5
