"""Evaluation: FID Inception feature extraction and weights, FID / IS / precision-recall, statistics.

The Inception tests compile the network for two input shapes, (3, 128, 128, 3) float32 (shared with
the check_reference test of a generated file) and (2, 128, 128, 3) uint8; everything else is small.
"""
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from srdd_jax.evaluation import inception_weights as fid_inception
from srdd_jax.convert import state_dict as sd
from srdd_jax.evaluation import inception, metrics, stats
from srdd_jax.tools import convert_inception
from tests.conftest import reference_file
from tests.inception_numpy import generated_case, resize_bilinear


@pytest.fixture(scope='session')
def fid_ref():
  """(reference npz dict, its PyTorch-layout state dict, converted params)."""
  with np.load(reference_file('fid_inception.npz')) as z:
    data = {k: z[k] for k in z.files}
  state = {k[len('inception/'):]: v for k, v in data.items() if k.startswith('inception/')}
  return data, state, fid_inception.convert_inception(state)


@pytest.fixture(scope='session')
def fid_generated():
  """Re-randomised weights whose features depend on the image (the reference file's barely do), their
  params, 3 structured 128 px images (NHWC) and the float64 NumPy transcription's pool3 of them."""
  weights, images, pool3, _ = generated_case(reference_file('fid_inception.npz'))
  params = fid_inception.convert_inception({k[len('inception/'):]: v for k, v in weights.items()})
  return params, _nhwc(images), pool3


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


# ---------------------------------------------------------------------------------------------------
# Feature extraction
# ---------------------------------------------------------------------------------------------------

def test_preprocess_is_pytorch_bilinear_then_2x_minus_1():
  x = np.random.default_rng(0).uniform(0, 1, (1, 3, 37, 50))
  ours = np.asarray(jax.jit(inception.preprocess)(jnp.asarray(_nhwc(x), jnp.float32)))
  want = _nhwc(2 * resize_bilinear(x, 299) - 1)
  assert ours.shape == (1, 299, 299, 3)
  assert np.max(np.abs(ours - want)) < 1e-6


def test_extract_uint8_batched_equals_float(fid_generated):
  """uint8 in [0, 255] and float in [0, 1] are the same input; an odd N pads the last batch and the
  result does not depend on the batch size; both agree with the float64 NumPy transcription (the
  reference file itself is checked in tests/test_check_reference.py)."""
  params, images, pool3_np = fid_generated
  u8 = np.round(images * 255).astype(np.uint8)
  a = inception.extract(params, u8, batch_size=2)  # Batches of 2 and 1 (padded).
  b = inception.extract(params, u8.astype(np.float32) / 255, batch_size=3)
  assert a['pool3'].shape == (3, 2048) and a['logits'].shape == (3, 1008)
  np.testing.assert_allclose(a['pool3'], b['pool3'], rtol=0, atol=1e-5 * np.abs(b['pool3']).max())
  bias = np.asarray(params['fc']['bias'])
  np.testing.assert_allclose(a['logits_unbiased'], a['logits'] - bias, rtol=0, atol=1e-6)
  # 8-bit quantisation moves the features a little; far less than the images differ from each other.
  e = np.linalg.norm(a['pool3'] - pool3_np) / np.linalg.norm(pool3_np)
  assert e < 1e-2, e


def test_extract_rejects_wrong_inputs(fid_ref):
  params = fid_ref[2]
  with pytest.raises(ValueError, match=r'must lie in \[0, 1\].*\(x \+ 1\) / 2'):
    inception.extract(params, np.full((1, 8, 8, 3), -0.5, np.float32))
  with pytest.raises(ValueError, match='NHWC images with 1 or 3 channels'):
    inception.extract(params, np.zeros((1, 3, 8, 8), np.uint8))
  with pytest.raises(ValueError, match='dtype int32'):
    inception.extract(params, np.zeros((1, 8, 8, 3), np.int32))


# ---------------------------------------------------------------------------------------------------
# Weights: hash check, conversion, converted .npz
# ---------------------------------------------------------------------------------------------------

def test_published_hash_matches_the_file_name():
  # Torch-hub names carry the first 8 hex digits of the SHA-256 of the file.
  assert fid_inception.FID_WEIGHTS_SHA256.startswith(fid_inception.FID_WEIGHTS_FILE.split('-')[-1][:8])
  assert len(fid_inception.FID_WEIGHTS_SHA256) == 64


def test_wrong_hash_is_a_clear_error_before_torch(tmp_path, capsys):
  fake = tmp_path / fid_inception.FID_WEIGHTS_FILE
  fake.write_bytes(b'not the weights')
  digest = hashlib.sha256(b'not the weights').hexdigest()
  with pytest.raises(fid_inception.WeightsHashMismatch) as e:
    fid_inception.load_inception(fake)
  msg = str(e.value)
  assert str(fake) in msg and digest in msg and fid_inception.FID_WEIGHTS_SHA256 in msg
  assert convert_inception.main(['--pth', str(fake), '--out', str(tmp_path / 'w.npz')]) == 2
  err = capsys.readouterr().err
  assert digest in err and fid_inception.FID_WEIGHTS_SHA256 in err
  assert not (tmp_path / 'w.npz').exists()
  with pytest.raises(FileNotFoundError, match='absent.pth'):
    fid_inception.load_inception(tmp_path / 'absent.pth')


def test_pth_to_npz_and_back(fid_ref, tmp_path, monkeypatch, capsys):
  """The CLI path with a stand-in .pth: hash checked, state dict read, strict check, .npz written; the
  .npz loads as verified params equal to the direct conversion, and an edited .npz is refused."""
  data, state, params = fid_ref
  pth = tmp_path / fid_inception.FID_WEIGHTS_FILE
  pth.write_bytes(b'stand-in for the published file')
  monkeypatch.setattr(fid_inception, 'FID_WEIGHTS_SHA256', hashlib.sha256(pth.read_bytes()).hexdigest())
  # torch is not a dependency: the reading of the .pth itself is replaced by the reference state dict.
  monkeypatch.setattr(sd, '_load_torch', lambda path: {k: np.asarray(v, np.float32) for k, v in state.items()})
  out = tmp_path / 'fid_weights.npz'
  assert convert_inception.main(['--pth', str(pth), '--out', str(out)]) == 0, capsys.readouterr()
  assert 'checked and wrote 472 weight arrays' in capsys.readouterr().out
  assert convert_inception.main(['--pth', str(pth), '--out', str(out)]) == 2  # No silent overwrite.
  assert 'exists' in capsys.readouterr().err

  loaded, info = fid_inception.load_inception(out)
  assert info['verified'] and info['sha256'] == fid_inception.FID_WEIGHTS_SHA256
  same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), loaded, params)
  assert all(jax.tree_util.tree_leaves(same))

  with np.load(out) as z:
    edited = {k: z[k] for k in z.files}
  edited['inception/fc.bias'] = edited['inception/fc.bias'] + 1e-3
  np.savez(tmp_path / 'edited.npz', **edited)
  with pytest.raises(fid_inception.WeightsHashMismatch, match='arrays changed after conversion'):
    fid_inception.load_inception(tmp_path / 'edited.npz')
  # The random-weight reference file is not the published weights: refused unless asked for.
  with pytest.raises(fid_inception.WeightsHashMismatch, match="meta kind 'fid_inception'"):
    fid_inception.load_inception(reference_file('fid_inception.npz'))
  _, info = fid_inception.load_inception(reference_file('fid_inception.npz'), allow_unverified=True)
  assert not info['verified']


def test_state_dict_mismatch_lists_every_problem(fid_ref):
  shapes = {k: np.shape(v) for k, v in fid_ref[1].items()}
  del shapes['Mixed_6c.branch7x7_2.conv.weight']
  shapes['fc.weight'] = (1000, 2048)
  shapes['AuxLogits.fc.weight'] = (1000, 768)
  with pytest.raises(sd.StateDictMismatch) as e:
    fid_inception.map_inception(shapes)
  msg = str(e.value)
  assert 'AuxLogits.fc.weight' in msg and 'Mixed_6c/branch7x7_2/conv/kernel' in msg
  assert 'fc.weight: shape (1000, 2048)' in msg


# ---------------------------------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------------------------------

def _random_cov(rng, d):
  x = rng.normal(size=(d, 2 * d)) * rng.uniform(0.2, 2.0, (d, 1))
  return x @ x.T / (2 * d)


def test_fid_matches_scipy_sqrtm():
  d = 64
  rng = np.random.default_rng(d)
  s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  want_tr = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
  tr = metrics.trace_sqrt_product(s1, s2)
  assert abs(tr - want_tr) <= 1e-6 * abs(want_tr), (tr, want_tr)
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * want_tr
  fid = metrics.frechet_distance(mu1, s1, mu2, s2)
  assert abs(fid - want) <= 1e-6 * abs(want), (fid, want)
  # Symmetric in its arguments, though the two orders take different square roots.
  assert abs(metrics.frechet_distance(mu2, s2, mu1, s1) - fid) <= 1e-9 * fid


def test_fid_at_inceptions_2048_dimensions_matches_an_exact_value():
  """At FID's own size, against an exact value instead of scipy's Schur-based sqrtm (70 s of CPU at
  d = 2048, the cost of this file): with Σ1 = L Lᵀ (Cholesky), Σ2 = L⁻ᵀ diag(m) L⁻¹ makes Σ1 Σ2 =
  L diag(m) L⁻¹ similar to diag(m), so Tr((Σ1 Σ2)^½) = Σ √m exactly, for a pair that does not commute.
  The 1e-6 asked for leaves room for other BLAS/LAPACK builds."""
  d = 2048
  rng = np.random.default_rng(d)
  s1 = _random_cov(rng, d)
  inv_lt = scipy.linalg.solve_triangular(np.linalg.cholesky(s1).T, np.eye(d), lower=False)  # L⁻ᵀ.
  m = rng.uniform(0.05, 4.0, d)
  s2 = (inv_lt * m) @ inv_lt.T
  cols = slice(0, 16)  # Not a commuting pair (a few columns of Σ1 Σ2 - Σ2 Σ1 show it).
  assert np.abs(s1 @ s2[:, cols] - s2 @ s1[:, cols]).max() > 0.1 * np.abs(s1 @ s2[:, cols]).max()
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  want_tr = np.sum(np.sqrt(m))
  tr = metrics.trace_sqrt_product(s1, s2)
  assert abs(tr - want_tr) <= 1e-6 * abs(want_tr), (tr, want_tr)
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * want_tr
  fid = metrics.frechet_distance(mu1, s1, mu2, s2)
  assert abs(fid - want) <= 1e-6 * abs(want), (fid, want)


def test_fid_closed_form_for_commuting_covariances():
  """Σ1 = Q diag(a) Qᵀ, Σ2 = Q diag(b) Qᵀ: FID = ‖μ1−μ2‖² + Σ (√a − √b)², singular ones included."""
  rng = np.random.default_rng(3)
  d = 96
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  a = rng.uniform(0.1, 4.0, d)
  b = rng.uniform(0.1, 4.0, d)
  a[:10] = 0.0  # Rank-deficient, as the covariance of fewer samples than dimensions.
  b[5:15] = 0.0
  s1, s2 = (q * a) @ q.T, (q * b) @ q.T
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert abs(metrics.trace_sqrt_product(s1, s2) - np.sum(np.sqrt(a * b))) < 1e-10 * np.sum(np.sqrt(a * b))
  assert abs(metrics.frechet_distance(mu1, s1, mu2, s2) - want) < 1e-10 * want
  assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-10 * np.trace(s1)


def test_fid_rejects_mismatched_statistics():
  with pytest.raises(ValueError, match='different dimensions'):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match=r'first statistics: expected mu \(d,\) and sigma \(d, d\)'):
    metrics.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match='non-finite'):
    metrics.frechet_distance(np.zeros(2), np.eye(2), np.array([0, np.nan]), np.eye(2))


# ---------------------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------------------

def _one_hot_logits(labels, classes=1008):
  # A margin of 1000 makes p(y|x) exactly one-hot in float64 (exp(-1000) underflows to 0).
  return 1000.0 * np.eye(classes)[labels]


def test_inception_score_exact_values():
  # Each of the 10 splits of 8 samples sees 4 classes equally often: IS = 4 in every split.
  mean, std = metrics.inception_score(_one_hot_logits(np.arange(80) % 4))
  assert mean == pytest.approx(4.0, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
  # Five splits see 2 classes, five see 5: scores 2 and 5, mean 3.5, std 1.5.
  labels = np.concatenate([np.arange(50) % 2, np.arange(50) % 5])
  mean, std = metrics.inception_score(_one_hot_logits(labels))
  assert mean == pytest.approx(3.5, rel=1e-12) and std == pytest.approx(1.5, rel=1e-12)
  # A confident, constant prediction scores 1.
  assert metrics.inception_score(_one_hot_logits(np.zeros(20, int)))[0] == pytest.approx(1.0, rel=1e-12)
  # Soft predictions by hand: p = (3/4, 1/4) and (1/4, 3/4), p(y) = (1/2, 1/2).
  logits = np.log([[0.75, 0.25], [0.25, 0.75]])
  kl = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
  assert metrics.inception_score(logits, splits=1) == pytest.approx((np.exp(kl), 0.0), rel=1e-12)


def test_inception_score_errors():
  with pytest.raises(ValueError, match='at least one sample per split'):
    metrics.inception_score(np.zeros((5, 10)))


# ---------------------------------------------------------------------------------------------------
# Precision / recall
# ---------------------------------------------------------------------------------------------------

# Real points on a line, 10 apart: 3rd-neighbour radii are 30 at both ends, 20 inside.
_LINE = np.array([[0, 0], [10, 0], [20, 0], [30, 0], [40, 0], [50, 0]], np.float32)
# Inside the ball of (20, 0) (15.8 <= 20); of (50, 0) (10 <= 30); outside all; exactly on the boundary
# of (0, 0) (30 = 30, inside); outside all (40.3 > 30 from (0, 0), 40.3 > 20 from (10, 0)).
_PROBES = np.array([[25, 15], [60, 0], [100, 0], [-30, 0], [5, 40]], np.float32)


def test_knn_radii_exclude_the_point_itself():
  np.testing.assert_array_equal(metrics.knn_radii(_LINE, 3), np.array([30, 20, 20, 20, 20, 30]) ** 2)
  # Duplicates are neighbours at distance 0: four copies of a point have radius 0.
  dup = np.array([[0, 0]] * 4 + [[7, 0]], np.float32)
  np.testing.assert_array_equal(metrics.knn_radii(dup, 3), [0, 0, 0, 0, 49])
  with pytest.raises(ValueError, match='need more than 3 points'):
    metrics.knn_radii(_LINE[:3], 3)


def test_precision_recall_exact_on_constructed_sets():
  pr = metrics.precision_recall(_LINE, _PROBES, k=3)
  assert pr['precision'] == 3 / 5
  # Recall of the line under the probes' manifold: probe radii (3rd neighbour among the probes, squared)
  # are computed by hand below, and each real point checked against every probe ball.
  d2 = ((_PROBES[:, None] - _PROBES[None]) ** 2).sum(-1).astype(np.float64)
  np.fill_diagonal(d2, np.inf)
  r = np.sort(d2, axis=1)[:, 2]
  covered = (((_LINE[:, None] - _PROBES[None]) ** 2).sum(-1) <= r[None]).any(1)
  assert pr['recall'] == covered.mean()
  # The definitions are mirror images: swapping the sets swaps precision and recall.
  swapped = metrics.precision_recall(_PROBES, _LINE, k=3)
  assert swapped == {'precision': pr['recall'], 'recall': pr['precision']}
  # A fake set equal to the real one has precision = recall = 1.
  assert metrics.precision_recall(_LINE, _LINE, k=3) == {'precision': 1.0, 'recall': 1.0}


def test_precision_recall_duplicates_and_boundaries():
  real = np.array([[0, 0]] * 4 + [[100, 0]] * 4, np.float32)  # Two clusters of radius 0.
  fake = np.array([[0, 0], [100, 0], [1, 0], [50, 0]], np.float32)
  assert metrics.precision_recall(real, fake, k=3)['precision'] == 2 / 4


def test_precision_recall_blocks_match_brute_force():
  rng = np.random.default_rng(5)
  real = rng.normal(size=(150, 8)).astype(np.float32)
  fake = (rng.normal(size=(110, 8)) * 1.3 + 0.4).astype(np.float32)

  def brute(a, b, k=3):
    def radii(x):
      d = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
      np.fill_diagonal(d, np.inf)
      return np.sort(d, axis=1)[:, k - 1]
    d = ((b[:, None].astype(np.float64) - a[None]) ** 2).sum(-1)  # (fake, real)
    return {'precision': float((d <= radii(a)[None]).any(1).mean()),
            'recall': float((d <= radii(b)[:, None]).any(0).mean())}

  want = brute(real, fake)
  assert 0.2 < want['precision'] < 1 and 0.2 < want['recall'] < 1  # Not a trivial case.
  assert metrics.precision_recall(real, fake) == want
  assert metrics.precision_recall(real, fake, row_batch=32, col_batch=47) == want


# ---------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------

def test_streaming_statistics_match_numpy():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16)) + 1e4  # Far from 0: no cancellation.
  acc = stats.StatsAccumulator()
  for i in range(0, 500, 64):
    acc.update(x[i:i + 64].astype(np.float32).astype(np.float64))
  mu, sigma = acc.finalize()
  xf = x.astype(np.float32).astype(np.float64)
  np.testing.assert_allclose(mu, xf.mean(0), rtol=1e-13)
  np.testing.assert_allclose(sigma, np.cov(xf, rowvar=False), rtol=1e-9, atol=1e-9)
  assert acc.count == 500
  with pytest.raises(ValueError, match='dimension 3 after 16'):
    acc.update(np.zeros((2, 3)))


def test_statistics_files_and_openai_reference_batches(fid_generated, tmp_path):
  rng = np.random.default_rng(4)
  mu, sigma = stats.feature_statistics(rng.normal(size=(40, 6)))
  path = stats.save_statistics(tmp_path / 'ref.npz', mu, sigma, count=40, weights_sha256='abc',
                               source='unit test')
  ref = stats.load_reference_batch(path)
  np.testing.assert_array_equal(ref.mu, mu)
  np.testing.assert_array_equal(ref.sigma, sigma)
  assert ref.meta['count'] == 40 and ref.meta['inception_weights_sha256'] == 'abc'
  with pytest.raises(FileExistsError):
    stats.save_statistics(path, mu, sigma, count=40, weights_sha256='abc')

  # OpenAI's layout: arr_0 images plus mu/sigma and the unused spatial mu_s/sigma_s.
  params, images, _ = fid_generated
  imgs = np.round(images * 255).astype(np.uint8)
  imgs = np.concatenate([imgs, imgs[:1, :, ::-1]])  # 4 images.
  np.savez(tmp_path / 'openai.npz', arr_0=imgs, mu=mu, sigma=sigma, mu_s=np.zeros(3), sigma_s=np.eye(3))
  ref = stats.load_reference_batch(tmp_path / 'openai.npz', images=True)
  assert ref.images.shape == (4, 128, 128, 3) and ref.has_statistics
  np.testing.assert_array_equal(stats.reference_statistics(tmp_path / 'openai.npz')[0], mu)

  # Images only: the statistics are those of the images' pool3 features.
  np.savez(tmp_path / 'images_only.npz', arr_0=imgs)
  with pytest.raises(ValueError, match='holds images only; pass the Inception params'):
    stats.reference_statistics(tmp_path / 'images_only.npz')
  mu_i, sigma_i = stats.reference_statistics(tmp_path / 'images_only.npz', params, batch_size=2)
  want_mu, want_sigma = stats.feature_statistics(inception.extract(params, imgs, batch_size=2)['pool3'])
  np.testing.assert_allclose(mu_i, want_mu, rtol=1e-12)
  np.testing.assert_allclose(sigma_i, want_sigma, rtol=1e-9, atol=1e-15)

  np.savez(tmp_path / 'bad.npz', arr_0=imgs.astype(np.float32))
  with pytest.raises(ValueError, match='bad.npz: `arr_0` must be uint8 NHWC'):
    stats.load_reference_batch(tmp_path / 'bad.npz', images=True)
  np.savez(tmp_path / 'empty.npz', x=np.zeros(2))
  with pytest.raises(ValueError, match=r"empty.npz: neither `mu`/`sigma` nor `arr_0`"):
    stats.load_reference_batch(tmp_path / 'empty.npz')


def test_inception_stats_cli_folder_and_refusals(fid_generated, tmp_path, monkeypatch, capsys):
  from PIL import Image
  from srdd_jax.tools import inception_stats
  params, images, _ = fid_generated
  imgs = np.round(images * 255).astype(np.uint8)
  folder = tmp_path / 'imgs'
  folder.mkdir()
  for i, im in enumerate(imgs):
    Image.fromarray(im).save(folder / f'{i:03d}.png')
  # Verified weights: a converted .npz of a stand-in file whose hash plays the published one.
  stand_in = hashlib.sha256(b'stand-in').hexdigest()
  monkeypatch.setattr(fid_inception, 'FID_WEIGHTS_SHA256', stand_in)
  weights = generated_case(reference_file('fid_inception.npz'))[0]
  wpath = fid_inception.save_npz(tmp_path / 'w.npz', {k[len('inception/'):]: v for k, v in weights.items()},
                                 source_sha256=stand_in)
  out = tmp_path / 'stats.npz'
  rc = inception_stats.main(['--weights', wpath, '--images', str(folder), '--out', str(out),
                             '--batch_size', '2'])
  assert rc == 0, capsys.readouterr()
  ref = stats.load_reference_batch(out)
  mu, sigma = stats.feature_statistics(inception.extract(params, imgs, batch_size=2)['pool3'])
  np.testing.assert_allclose(ref.mu, mu, rtol=1e-12)
  np.testing.assert_allclose(ref.sigma, sigma, rtol=1e-9, atol=1e-15)
  assert ref.meta['count'] == 3 and ref.meta['inception_weights_sha256'] == stand_in
  capsys.readouterr()

  # Weights that are not the published ones (the random reference file): refused, nothing written.
  out2 = tmp_path / 'stats2.npz'
  assert inception_stats.main(['--weights', reference_file('fid_inception.npz'), '--images', str(folder),
                               '--out', str(out2)]) == 2
  assert "meta kind 'fid_inception'" in capsys.readouterr().err and not out2.exists()
  # Images of different sizes in one folder: the file is named.
  Image.fromarray(imgs[0, :64]).save(folder / '999.png')
  assert inception_stats.main(['--weights', wpath, '--images', str(folder), '--out', str(out2)]) == 2
  assert '999.png: size 128x64' in capsys.readouterr().err
