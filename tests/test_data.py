"""Input pipelines: order, process slices, resume, VAR preprocessing, and each source (no JAX, no network)."""
from __future__ import annotations

import gzip
import logging
import os
import time

import jax
import numpy as np
import pytest
from PIL import Image

from srdd_jax.data import preprocess as pp
from srdd_jax.data.arrays import ArraySource
from srdd_jax.data.pipeline import DataError, build_source, rows_for_process
from srdd_jax.data.synthetic import SyntheticImages

FASHION_DIR = '/usr/share/datasets/fashion-mnist'


def indexed_source(n: int, size: int = 8, **options) -> ArraySource:
  """Image i is uniformly 10*i (so a pixel tells the index) and its label is i."""
  images = np.stack([np.full((size + 2, size + 4, 3), 10 * i, np.uint8) for i in range(n)])
  return ArraySource(images, np.arange(n), n, image_size=size, description='indexed', resize_ratio=1.25, **options)


def expected_labels(seed: int, n: int, positions: range) -> np.ndarray:
  """Indices at global positions: per-epoch permutations drawn from (seed, epoch), concatenated."""
  return np.array([np.random.default_rng([seed, p // n]).permutation(n)[p % n] for p in positions])


# --- order, slicing, resume ---

def test_order_is_the_permutation_of_seed_and_epoch():
  a, b = indexed_source(10), indexed_source(10)
  for step in range(4):  # Steps 2 and 3 cross from epoch 0 into 1 and from 1 into 2.
    _, la = a.batch(5, step, 4)
    np.testing.assert_array_equal(la, expected_labels(5, 10, range(4 * step, 4 * step + 4)))
    np.testing.assert_array_equal(b.batch(5, step, 4)[1], la)  # A fresh source: same batches.
  assert not np.array_equal(a.batch(6, 0, 10)[1], a.batch(5, 0, 10)[1])


def test_every_example_once_per_epoch():
  s = indexed_source(12)
  labels = np.concatenate([s.batch(1, step, 4)[1] for step in range(9)])  # Three epochs.
  epochs = labels.reshape(3, 12)
  for e in epochs:
    np.testing.assert_array_equal(np.sort(e), np.arange(12))
  assert len({tuple(e) for e in epochs}) == 3


def test_process_rows_together_equal_the_global_batch():
  s = indexed_source(10, random_crop=True, flip=True)
  images, labels = s.batch(3, 7, 16)
  for count in (2, 4):
    parts = [indexed_source(10, random_crop=True, flip=True).batch(3, 7, 16, rows_for_process(16, i, count))
             for i in range(count)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), images)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), labels)
  assert rows_for_process(16, 1, 2) == slice(8, 16)
  with pytest.raises(DataError, match='does not split evenly'):
    rows_for_process(10, 0, 4)
  with pytest.raises(DataError, match='contiguous slices'):
    s.batch(3, 7, 16, slice(8, 20))
  # A host of a TPU pod can hold scattered row blocks (v5p-64: blocks 0, 1, 4, 5 of 8): its spans give
  # those rows, in the batch's order, and the hosts' spans together give the global batch.
  spans = (slice(0, 2), slice(8, 10))
  part = indexed_source(10, random_crop=True, flip=True).batch(3, 7, 16, spans)
  np.testing.assert_array_equal(part[0], images[np.r_[0:2, 8:10]])
  np.testing.assert_array_equal(part[1], labels[np.r_[0:2, 8:10]])
  for bad in ((slice(8, 10), slice(0, 2)), (slice(0, 4), slice(2, 6)), ()):
    with pytest.raises(DataError, match='rows='):
      s.batch(3, 7, 16, bad)


def test_crop_and_flip_depend_on_seed_step_and_position():
  size = 8
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (20, 30, 3), np.uint8)
  s = ArraySource(np.stack([image] * 4), np.zeros(4), 1, image_size=size, description='one', resize_ratio=2.0,
                  random_crop=True, flip=True)
  x = s.batch(0, 0, 64)[0]
  assert len({a.tobytes() for a in x}) > 50  # The same image, cropped and flipped differently per position.
  np.testing.assert_array_equal(s.batch(0, 0, 64)[0], x)
  assert not np.array_equal(s.batch(0, 1, 64)[0], x)


def test_resume_batch_equals_iterator():
  s = indexed_source(10, random_crop=True, flip=True)
  it = s.iterator(2, 0, 6)
  from_start = [next(it) for _ in range(4)]
  for step in range(4):
    fresh = indexed_source(10, random_crop=True, flip=True).batch(2, step, 6)
    np.testing.assert_array_equal(from_start[step][0], fresh[0])
    np.testing.assert_array_equal(from_start[step][1], fresh[1])
  resumed = indexed_source(10, random_crop=True, flip=True).iterator(2, 3, 6, rows=slice(2, 5))
  images, labels = next(resumed)
  np.testing.assert_array_equal(images, from_start[3][0][2:5])
  np.testing.assert_array_equal(labels, from_start[3][1][2:5])
  assert images.dtype == np.float32 and labels.dtype == np.int32 and images.shape == (3, 8, 8, 3)


def test_synthetic_source_matches_synthetic_images():
  s = build_source({'source': 'synthetic', 'num_examples': 20, 'num_classes': 4}, 16)
  assert (s.num_examples, s.num_classes) == (20, 4)
  ref = SyntheticImages(20, 4, 16)
  for step in (0, 3):
    want, got = ref.batch(1, step, 8), s.batch(1, step, 8)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


# --- VAR preprocessing ---

def test_shorter_side_is_resized_with_lanczos_and_torchvision_rounding():
  tall = Image.fromarray(np.zeros((60, 40, 3), np.uint8))
  assert pp.resize_shorter(tall, 18).size == (18, 27)  # (width, height); 18 * 60 / 40 = 27.
  wide = Image.fromarray(np.zeros((41, 100, 3), np.uint8))
  assert pp.resize_shorter(wide, 18).size == (43, 18)  # int(18 * 100 / 41) = int(43.9).
  gradient = Image.fromarray(np.tile(np.arange(0, 200, 5, dtype=np.uint8), (30, 1)))
  np.testing.assert_array_equal(np.asarray(pp.resize_shorter(gradient, 18)),
                                np.asarray(gradient.resize((24, 18), Image.Resampling.LANCZOS)))
  out = pp.preprocess(np.zeros((60, 40, 3), np.uint8), 16, 1.125, crop_uv=(0.99, 0.99))
  assert out.shape == (16, 16, 3) and out.dtype == np.float32


def test_pixels_become_minus_one_one_with_the_same_bits_on_host_and_devices():
  """uint8 goes to the devices and is normalised there: ToTensor's x/255*2-1 to within one float32
  ulp, and the same bits in numpy and in a jitted function (where XLA rewrites divisions)."""
  x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
  host = pp.to_model_range(x)
  assert host.dtype == np.float32 and host.min() == -1 and host.max() == 1
  np.testing.assert_allclose(host, x.astype(np.float64) / 127.5 - 1, rtol=0, atol=1.2e-7)  # One float32 ulp at 1.
  np.testing.assert_array_equal(np.asarray(jax.jit(pp.to_model_range)(x)), host)
  floats = np.linspace(-1, 1, 7, dtype=np.float32)  # Synthetic images are float already: unchanged.
  np.testing.assert_array_equal(pp.to_model_range(floats), floats)


def test_center_crop_of_a_known_image_and_flip():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (18, 24, 3), np.uint8)  # Shorter side already round(1.125 * 16) = 18.
  out = pp.pixels(image, 16)
  # torchvision's CenterCrop: top = round((18 - 16) / 2) = 1, left = round((24 - 16) / 2) = 4.
  np.testing.assert_array_equal(out, image[1:17, 4:20])
  np.testing.assert_array_equal(pp.pixels(image, 16, flip=True), out[:, ::-1])
  np.testing.assert_array_equal(pp.preprocess(image, 16, flip=True), pp.to_model_range(out[:, ::-1]))
  corner = pp.pixels(image, 16, crop_uv=(0.0, 0.999))
  np.testing.assert_array_equal(corner, image[0:16, 8:24])
  assert pp.crop_offsets(18, 24, 16, (0.5, 0.5)) == (1, 4)


def test_grayscale_and_rgba_become_rgb_in_minus_one_one():
  grey = np.arange(0, 256, 4, dtype=np.uint8).reshape(8, 8)
  for image in (grey, grey[..., None], Image.fromarray(grey, 'L')):
    out = pp.preprocess(image, 8, resize_ratio=1.0)
    assert out.shape == (8, 8, 3)
    for c in range(3):
      np.testing.assert_array_equal(out[..., c], pp.to_model_range(grey))
  rgba = np.dstack([np.full((8, 8, 3), 255, np.uint8), np.zeros((8, 8), np.uint8)])
  np.testing.assert_array_equal(pp.preprocess(rgba, 8, 1.0), np.ones((8, 8, 3), np.float32))
  out = pp.preprocess(np.array([[0, 255], [255, 0]], np.uint8), 8)  # PIL clips Lanczos's overshoot.
  assert out.min() >= -1 and out.max() <= 1


# --- folders ---

def _save(path: str, value: int, size=(12, 10), mode='RGB', fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new(mode, size, value if mode == 'L' else (value,) * len(mode)).save(path, format=fmt)


def test_folder_with_class_subfolders(tmp_path):
  _save(str(tmp_path / 'zebra' / 'a.png'), 10)
  _save(str(tmp_path / 'zebra' / 'deep' / 'er' / 'b.WEBP'), 20, fmt='WEBP')
  _save(str(tmp_path / 'ant' / 'c.jpg'), 30)
  _save(str(tmp_path / 'ant' / 'd.jpeg'), 40, mode='L')
  _save(str(tmp_path / 'ant' / '.hidden.png'), 50)
  (tmp_path / 'ant' / 'notes.txt').write_text('not an image')
  s = build_source({'source': 'folder', 'path': str(tmp_path), 'labels': 'subfolder'}, 8, train=False)
  assert (s.num_examples, s.num_classes, s.classes) == (4, 2, ['ant', 'zebra'])
  assert [os.path.relpath(p, tmp_path) for p in s.paths] == ['ant/c.jpg', 'ant/d.jpeg', 'zebra/a.png',
                                                              'zebra/deep/er/b.WEBP']
  images, labels = s.batch(0, 0, 4)
  order = np.random.default_rng([0, 0]).permutation(4)
  np.testing.assert_array_equal(labels, np.array([0, 0, 1, 1])[order])
  png = images[list(order).index(2)]  # a.png: lossless, uniformly 10.
  np.testing.assert_array_equal(png, pp.to_model_range(np.full((8, 8, 3), 10, np.uint8)))
  assert images.shape == (4, 8, 8, 3) and images.min() >= -1 and images.max() <= 1


def test_flat_folder_is_recursive_and_unlabelled(tmp_path):
  for i, rel in enumerate(['x.png', 'a/y.jpg', 'a/b/z.webp']):
    _save(str(tmp_path / rel), 10 * i)
  s = build_source({'source': 'folder', 'path': str(tmp_path), 'labels': 'none'}, 8)
  assert (s.num_examples, s.num_classes) == (3, 1)
  assert [os.path.relpath(p, tmp_path) for p in s.paths] == ['a/b/z.webp', 'a/y.jpg', 'x.png']
  np.testing.assert_array_equal(s.batch(0, 0, 3)[1], [0, 0, 0])


def test_corrupt_files_are_skipped_counted_and_logged(tmp_path, caplog):
  for i in range(6):
    _save(str(tmp_path / f'ok{i}.png'), 10 * (i + 1))
  (tmp_path / 'bad0.jpg').write_bytes(b'not a jpeg at all')
  good = tmp_path / 'ok0.png'
  (tmp_path / 'bad1.png').write_bytes(good.read_bytes()[:40])  # A truncated PNG.
  config = {'source': 'folder', 'path': str(tmp_path), 'labels': 'none'}
  s = build_source(config, 8, train=False)
  assert s.num_examples == 8 and s.skipped == 0
  with caplog.at_level(logging.WARNING):
    images, _ = s.batch(4, 0, 8)
  assert s.skipped == 2
  assert 'bad0.jpg' in caplog.text and 'bad1.png' in caplog.text
  # Policy: a bad example's position takes the next readable example of the permutation.
  names = [os.path.basename(p) for p in s.paths]  # bad0, bad1, ok0 .. ok5
  perm = np.random.default_rng([4, 0]).permutation(8)
  for pos in range(8):
    k = pos
    while names[perm[k % 8]].startswith('bad'):
      k += 1
    value = 10 * (int(names[perm[k % 8]][2]) + 1)
    np.testing.assert_array_equal(images[pos], pp.to_model_range(np.full((8, 8, 3), value, np.uint8)))
  fresh = build_source(config, 8, train=False)
  np.testing.assert_array_equal(next(fresh.iterator(4, 0, 8))[0], images)  # Same batch on the reading threads.
  assert fresh.skipped == 2
  spans = (slice(1, 3), slice(5, 7))  # A pod host's scattered rows, on tf.data threads too.
  np.testing.assert_array_equal(next(fresh.iterator(4, 0, 8, spans))[0], images[[1, 2, 5, 6]])


def test_folder_errors_name_the_key_and_path(tmp_path):
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(DataError, match=f"config.data.path='{missing}' does not exist"):
    build_source({'source': 'folder', 'path': missing}, 8)
  with pytest.raises(DataError, match=f"config.data.path='{tmp_path}' has no images"):
    build_source({'source': 'folder', 'path': str(tmp_path), 'labels': 'none'}, 8)
  with pytest.raises(DataError, match="has no class sub-folders.*labels='none'"):
    build_source({'source': 'folder', 'path': str(tmp_path)}, 8)
  (tmp_path / 'empty_class').mkdir()
  with pytest.raises(DataError, match="class folder 'empty_class' has no images"):
    build_source({'source': 'folder', 'path': str(tmp_path)}, 8)
  with pytest.raises(DataError, match='config.data.labels'):
    build_source({'source': 'folder', 'path': str(tmp_path), 'labels': 'files'}, 8)


def test_config_errors_name_the_key():
  with pytest.raises(DataError, match="config.data.source='imagenet'"):
    build_source({'source': 'imagenet'}, 8)
  with pytest.raises(DataError, match='config.data.resize_ratio=0.5'):
    build_source({'source': 'digits', 'resize_ratio': 0.5}, 8)
  with pytest.raises(DataError, match="config.data.split='val'"):
    build_source({'source': 'digits', 'split': 'val'}, 8)


# --- Fashion-MNIST, digits ---

def test_fashion_mnist_from_debian_idx_files():
  if not os.path.isdir(FASHION_DIR):
    msg = f'{FASHION_DIR} is absent: apt-get install dataset-fashion-mnist'
    if os.environ.get('CI', '').lower() == 'true':
      pytest.fail(msg)
    pytest.skip(msg)
  train = build_source({'source': 'fashion_mnist'}, 28)
  test = build_source({'source': 'fashion_mnist'}, 28, train=False)
  assert (train.num_examples, test.num_examples, train.num_classes) == (60000, 10000, 10)
  assert train.labels[0] == 9 and test.labels[0] == 9  # Both splits open with an ankle boot.
  with gzip.open(os.path.join(FASHION_DIR, 't10k-images-idx3-ubyte.gz')) as f:
    first = np.frombuffer(f.read(16 + 784), np.uint8, offset=16).reshape(28, 28)
  assert test.load(0)[0].shape == (28, 28) and np.array_equal(test.load(0)[0], first)
  images, labels = test.batch(0, 0, 4)
  assert images.shape == (4, 28, 28, 3) and labels.dtype == np.int32
  np.testing.assert_array_equal(images[..., 0], images[..., 2])  # Greyscale became RGB.


def test_fashion_mnist_without_idx_files_fails_fast_offline(tmp_path):
  t = time.time()
  with pytest.raises(DataError, match='apt-get install dataset-fashion-mnist'):
    build_source({'source': 'fashion_mnist', 'idx_dir': str(tmp_path / 'absent'), 'data_dir': str(tmp_path)}, 8)
  assert time.time() - t < 10


def test_digits():
  train = build_source({'source': 'digits'}, 8)
  test = build_source({'source': 'digits', 'resize_ratio': 1.0}, 8, train=False)
  assert (train.num_examples, test.num_examples, train.num_classes) == (1500, 297, 10)
  from sklearn import datasets  # pylint: disable=import-outside-toplevel
  d = datasets.load_digits()
  images, labels = test.batch(0, 0, 297)
  order = np.random.default_rng([0, 0]).permutation(297)
  np.testing.assert_array_equal(labels, d.target[1500:][order])
  want = np.round(d.images[1500 + order[0]] * 255 / 16) / 127.5 - 1
  np.testing.assert_allclose(images[0], np.repeat(want[..., None], 3, -1).astype(np.float32), atol=1e-6)


# --- TFDS ---

@pytest.fixture(scope='module')
def tiny_tfds(tmp_path_factory):
  """A 3-class TFDS dataset 'tiny_images' prepared offline, once as array_record and once as tfrecord."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    # Inside the `tests` package TFDS would look for a checksums file next to this module through the
    # optional `importlib_resources`; a module name outside any package makes it skip that search.
    __module__ = 'tiny_images_builder'
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3)), 'label': tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(7), 'test': self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {'image': np.full((10 + i % 2, 12, 3), 20 * i, np.uint8), 'label': i % 3}

  dirs = {}
  for fmt in ('array_record', 'tfrecord'):
    dirs[fmt] = str(tmp_path_factory.mktemp(fmt))
    TinyImages(data_dir=dirs[fmt], file_format=fmt).download_and_prepare()
  return dirs


def test_tfds_array_record_and_tfrecord_read_by_offset_agree(tiny_tfds):
  got = {}
  for fmt, data_dir in tiny_tfds.items():
    s = build_source({'source': 'tfds', 'name': 'tiny_images', 'data_dir': data_dir, 'split': 'train',
                      'resize_ratio': 1.25, 'workers': 3}, 8)
    assert (s.num_examples, s.num_classes) == (7, 3)
    assert ('random access' if fmt == 'array_record' else 'read by offset') in s.description, s.description
    got[fmt] = s.batch(0, 0, 7)
    # Read on 3 threads at once (a reader or file handle per thread): the same batches.
    for k, (images, labels) in zip(range(3), s.iterator(0, 0, 7)):
      want = s.batch(0, k, 7)
      np.testing.assert_array_equal(images, want[0])
      np.testing.assert_array_equal(labels, want[1])
  np.testing.assert_array_equal(got['array_record'][0], got['tfrecord'][0])
  np.testing.assert_array_equal(got['array_record'][1], got['tfrecord'][1])
  # A tfrecord split is never held in memory: per example, only where its record is (20 bytes).
  tfrecord = {'source': 'tfds', 'name': 'tiny_images', 'data_dir': tiny_tfds['tfrecord']}
  s = build_source({**tfrecord, 'split': 'train[2:]'}, 8)
  held = [v for v in vars(s).values() if isinstance(v, (bytes, list, tuple, np.ndarray))]
  assert s.num_examples == 5 and sum(v.nbytes for v in held if isinstance(v, np.ndarray)) == 20 * 5
  assert not [v for v in held if not isinstance(v, np.ndarray) and len(v) > 1]  # Only the file path.
  full = build_source({**tfrecord, 'split': 'train'}, 8)
  np.testing.assert_array_equal(s.load(0)[1], full.load(2)[1])
  np.testing.assert_array_equal(np.asarray(s.load(4)[0]), np.asarray(full.load(6)[0]))
  images, labels = got['array_record']
  values = np.round((images[:, 0, 0, 0] + 1) * 127.5).astype(int)
  assert sorted(values) == [20 * i for i in range(7)]  # TFDS may store examples in any order...
  np.testing.assert_array_equal(labels, (values // 20) % 3)  # ...but each image keeps its label.
  test = build_source({'source': 'tfds', 'name': 'tiny_images', 'data_dir': tiny_tfds['array_record']}, 8,
                      train=False)
  assert test.num_examples == 3


def test_tfds_errors_fail_fast(tiny_tfds, tmp_path):
  t = time.time()
  with pytest.raises(DataError) as e:
    build_source({'source': 'tfds', 'name': 'mnist', 'data_dir': str(tmp_path)}, 8)
  assert "'mnist'" in str(e.value) and str(tmp_path) in str(e.value) and 'config.data.download' in str(e.value)
  with pytest.raises(DataError, match="config.data.name='no_such_dataset_xyz'"):
    build_source({'source': 'tfds', 'name': 'no_such_dataset_xyz', 'data_dir': str(tmp_path)}, 8)
  with pytest.raises(DataError, match="config.data.split='validation'.*splits: \\['test', 'train'\\]"):
    build_source({'source': 'tfds', 'name': 'tiny_images', 'data_dir': tiny_tfds['array_record'],
                  'split': 'validation'}, 8)
  with pytest.raises(DataError, match='config.data.workers=-1'):
    build_source({'source': 'tfds', 'name': 'tiny_images', 'data_dir': tiny_tfds['tfrecord'], 'workers': -1}, 8)
  assert time.time() - t < 10
