"""--mode=eval: samples with per-batch seeds, metrics against references, eval.json; no FID or IS
without the published Inception weights."""
import json

import ml_collections
import numpy as np
import pytest

from srdd_jax.config import DEFAULTS, ConfigError
from srdd_jax.evaluation import protocol
from srdd_jax.modes import eval as evaluation
from tests.conftest import reference_file, save_tiny_models



@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """A tiny tokenizer (16 px) and class-conditional transformer, untrained, saved as a user's would be."""
  return save_tiny_models(str(tmp_path_factory.mktemp('models')))


def _config(checkpoints, **eval_options):
  from configs import sample
  c = sample.get_config()
  c.model.checkpoint, c.tokenizer.checkpoint = checkpoints
  c.sampler.top_k, c.sampler.top_p = 0, 0.0
  c.eval = ml_collections.ConfigDict(dict(num_per_class=2, batch_size=8, **eval_options))
  return c


def test_no_fid_without_the_published_weights(checkpoints, tmp_path):
  with pytest.raises(ConfigError, match='config.eval.inception_weights is empty: .* No FID or IS is computed'):
    evaluation.run(_config(checkpoints, metrics='fid,is'), str(tmp_path))
  # The reference file's Inception weights are random: refused, whatever they are called.
  with pytest.raises(ConfigError, match='config.eval.inception_weights: .*not an .npz written from the '
                                        'published weights'):
    evaluation.run(_config(checkpoints, metrics='is', inception_weights=reference_file('fid_inception.npz')),
                        str(tmp_path))
  with pytest.raises(ConfigError, match=r"config.eval.metrics='fid,bogus'"):
    evaluation.run(_config(checkpoints, metrics='fid,bogus'), str(tmp_path))
  with pytest.raises(ConfigError, match='config.data is missing'):
    evaluation.run(_config(checkpoints, metrics='proxy'), str(tmp_path))
  assert not (tmp_path / 'eval').exists()  # Refused before sampling: nothing written.


def test_proxy_metrics_of_generated_samples(checkpoints, tmp_path):
  c = _config(checkpoints, metrics='proxy', proxy_epochs=1, proxy_examples=200)
  c.data = ml_collections.ConfigDict(dict(source='digits', flip=False))
  s = evaluation.run(c, str(tmp_path))
  m = json.load(open(tmp_path / 'eval' / 'eval.json'))
  assert m['metrics'] == s['metrics'] and set(m['metrics']) >= {'fd_cnn_digits_16px', 'class_consistency',
                                                               'classifier_test_accuracy'}
  assert m['metrics']['fd_cnn_digits_16px'] > 0 and 0 <= m['metrics']['class_consistency'] <= 1
  assert m['protocol']['num_samples'] == 20 and m['metrics']['proxy_real_examples'] == 200
  with np.load(tmp_path / 'eval' / 'samples.npz') as z:
    images, labels = z['arr_0'], z['arr_1']
  assert images.shape == (20, 16, 16, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 2))
  # Batches 0..2 have distinct keys: no two batches repeat an image.
  assert not np.array_equal(images[:8], images[8:16])
  # The same samples evaluated from their file give the same numbers (classifier from the cache).
  c.eval.samples = str(tmp_path / 'eval' / 'samples.npz')
  again = evaluation.run(c, str(tmp_path), overwrite=True)  # eval.json is replaced, the samples read.
  assert again['metrics'] == s['metrics']


def test_inception_metrics_are_assembled_from_the_features(monkeypatch, tmp_path):
  """The FID / IS / precision-recall plumbing, with the feature extractor replaced by fixed features
  (the network itself is tested against pytorch-fid in test_evaluation)."""
  from srdd_jax.evaluation import inception, metrics, stats
  rng = np.random.default_rng(0)
  fake = {'pool3': rng.standard_normal((40, 16)), 'logits_unbiased': rng.standard_normal((40, 12))}
  real_images = rng.integers(0, 255, (30, 8, 8, 3), dtype=np.uint8)
  real = {'pool3': rng.standard_normal((30, 16)) + 0.5}
  monkeypatch.setattr(inception, 'extract', lambda p, im, batch_size: fake if len(im) == 40 else real)
  ref = str(tmp_path / 'ref.npz')
  np.savez(ref, arr_0=real_images)
  o = {**DEFAULTS['eval'], 'metrics': ('fid', 'is', 'pr'), 'reference': ref}
  out = protocol.inception_metrics(o, {}, None, np.zeros((40, 8, 8, 3), np.uint8))
  mu, sigma = stats.feature_statistics(fake['pool3'])
  mu_r, sigma_r = stats.feature_statistics(real['pool3'])
  assert out['fid'] == pytest.approx(metrics.frechet_distance(mu, sigma, mu_r, sigma_r))
  assert out['inception_score'] == pytest.approx(metrics.inception_score(fake['logits_unbiased'])[0])
  pr = metrics.precision_recall(real['pool3'], fake['pool3'], k=3)
  assert (out['precision'], out['recall']) == (pr['precision'], pr['recall'])
