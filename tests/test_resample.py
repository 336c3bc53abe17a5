"""Exact PyTorch resampling: against the reference vectors and an independent per-pixel transcription."""
import math

import numpy as np
import pytest

from srdd_jax.tokenizer import resample
from tests.conftest import reference_file


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


@pytest.fixture(scope='module')
def ref():
  with np.load(reference_file('vqvae_ch32_256.npz')) as z:
    return {k: z[k] for k in z.files if k.startswith(('area_', 'bicubic_'))}


@pytest.mark.parametrize('pn', [1, 2, 3, 4, 5, 6, 8, 10, 13])
def test_area_matches_pytorch_vectors(ref, pn):
  out = resample.area_resize(_nhwc(ref['area_in']), pn)
  assert np.max(np.abs(np.asarray(out) - _nhwc(ref[f'area_out_{pn}']))) <= 1e-5


@pytest.mark.parametrize('pn', [1, 2, 3, 4, 5, 6, 8, 10, 13])
def test_bicubic_matches_pytorch_vectors(ref, pn):
  out = resample.bicubic_resize(_nhwc(ref[f'bicubic_in_{pn}']), 16)
  assert np.max(np.abs(np.asarray(out) - _nhwc(ref[f'bicubic_out_{pn}']))) <= 1e-5


def test_jax_image_resize_is_not_pytorch_bicubic(ref):
  # Guards the reason the matrices exist: jax.image's cubic kernel differs from PyTorch's.
  import jax
  x = _nhwc(ref['bicubic_in_5'])
  theirs = jax.image.resize(x, (x.shape[0], 16, 16, x.shape[3]), 'cubic')
  assert np.max(np.abs(np.asarray(theirs) - _nhwc(ref['bicubic_out_5']))) > 1e-3


def area_loop(x, out):
  """Adaptive average pooling written per output cell (PyTorch's definition), 1-D."""
  n = len(x)
  return np.array([x[(i * n) // out: math.ceil((i + 1) * n / out)].mean() for i in range(out)])


def bicubic_loop(x, out, a=-0.75):
  """PyTorch's upsample_bicubic2d (align_corners=False) written per output pixel, 1-D."""
  n = len(x)

  def w(d):
    d = abs(d)
    if d <= 1:
      return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
    if d < 2:
      return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
    return 0.0

  res = []
  for o in range(out):
    src = (o + 0.5) * n / out - 0.5
    f = math.floor(src)
    res.append(sum(w(src - (f + t)) * x[min(max(f + t, 0), n - 1)] for t in range(-1, 3)))
  return np.array(res)


@pytest.mark.parametrize('n_in,n_out', [(32, 24), (32, 18), (32, 13), (32, 9), (32, 6), (16, 7), (7, 3),
                                        (5, 5), (1, 4)])
def test_area_matrix_matches_definition(n_in, n_out):
  x = np.random.default_rng(n_in * 100 + n_out).normal(size=n_in)
  np.testing.assert_allclose(resample.area_matrix(n_in, n_out) @ x, area_loop(x, n_out), atol=1e-12)


@pytest.mark.parametrize('n_in,n_out', [(24, 32), (18, 32), (13, 32), (9, 32), (6, 32), (3, 32), (1, 32),
                                        (2, 16), (5, 16), (7, 9), (16, 16), (16, 7)])
def test_bicubic_matrix_matches_definition(n_in, n_out):
  x = np.random.default_rng(n_in * 100 + n_out).normal(size=n_in)
  np.testing.assert_allclose(resample.bicubic_matrix(n_in, n_out) @ x, bicubic_loop(x, n_out),
                             atol=1e-12)


def test_rows_sum_to_one_and_windows_overlap():
  for n_in, n_out in [(16, 13), (16, 5), (32, 24)]:
    np.testing.assert_allclose(resample.area_matrix(n_in, n_out).sum(1), 1.0)
    np.testing.assert_allclose(resample.bicubic_matrix(n_out, n_in).sum(1), 1.0)
  # 16 -> 5: cell 0 averages [0, 4), cell 1 averages [3, 7): index 3 is in both windows.
  m = resample.area_matrix(16, 5)
  assert m[0, 3] > 0 and m[1, 3] > 0
  np.testing.assert_allclose(m[0, :4], 0.25)


def test_bad_sizes_raise():
  with pytest.raises(ValueError, match='positive'):
    resample.area_matrix(16, 0)
  with pytest.raises(ValueError, match='rank 4'):
    resample.area_resize(np.zeros((16, 16, 3)), 4)


def _bilinear_loop(x, out):
  """PyTorch's upsample_bilinear2d (align_corners=False, no antialias) per output pixel, 1-D."""
  n = len(x)
  res = []
  for o in range(out):
    src = max((o + 0.5) * n / out - 0.5, 0.0)
    i0 = min(math.floor(src), n - 1)
    i1 = i0 + 1 if i0 < n - 1 else i0
    lam = src - i0
    res.append((1 - lam) * x[i0] + lam * x[i1])
  return np.array(res)


@pytest.mark.parametrize('n_in,n_out', [(16, 1), (16, 5), (16, 13), (32, 9), (4, 16), (16, 16)])
def test_bilinear_matrix_matches_definition(n_in, n_out):
  x = np.random.default_rng(n_in * 7 + n_out).normal(size=n_in)
  np.testing.assert_allclose(resample.bilinear_matrix(n_in, n_out) @ x, _bilinear_loop(x, n_out), atol=1e-12)
