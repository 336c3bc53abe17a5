"""A small CNN trained on the dataset itself: the feature space of the offline proxy metrics (SPEC §9).

Datasets without published Inception weights (Fashion-MNIST, digits, a folder of images) are judged in
the feature space of a classifier trained here, on the data source's train split and at the generator's
resolution, and cached under a work directory:

    clf = train_or_load(config.data, image_size=32, cache_dir=f'{workdir}/proxy_classifier')
    clf.features(images)   # (N, 128) float32 penultimate features; images NHWC uint8 or float in [0, 1]
    clf.predict(images)    # (N,) int32 classes
    clf.accuracy           # its accuracy on the test split, measured when it was trained

Cache layout: `cache_dir/<key>/` holds `params.msgpack` (flax.serialization) and `classifier.json`
(the request that produced it, test accuracy, example counts, epochs, the SHA-256 of the params file).
`<key>` is `<name>_<image_size>px_<hash>` where `<name>` is `cnn_<dataset>` (e.g. `cnn_fashion_mnist`)
and `<hash>` digests the whole request (the data config without its location keys, image size,
splits, network, training recipe, seed). A different request therefore trains into a different
directory and never reuses another's weights; a directory whose JSON does not describe the request
(edited by hand, or written by another version of this file) is an error, not silently used. An entry
is written to a temporary directory and renamed into place, so a crash never leaves half of one.

Training is deterministic given the seed on one backend (parameter init from the seed, example order
and flips from a NumPy generator of the seed). The images are the data pipeline's own preprocessing
with the centre crop (`train=False`), plus random horizontal flips when the generator's pipeline flips
(config.data.flip, default True), so the classifier is not fooled by mirrored samples. Random crops
are not reproduced (see `_load_arrays`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import time
import uuid
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from srdd_jax import files
from srdd_jax.data import pipeline
from srdd_jax.evaluation.inception import check_images
from srdd_jax.parallel import multihost
from srdd_jax.parallel.compile import inference_compiler_options

# Bump when the network, its input scaling or the training recipe changes: the version is part of the
# hashed request, so caches written by an older recipe are no longer found.
RECIPE_VERSION = 1
KIND = 'proxy_classifier'
PARAMS_FILE, INFO_FILE = 'params.msgpack', 'classifier.json'

# Keys that say where a dataset lives or how it is read, not which images it holds: moving the files
# must not invalidate the cache. split/random_crop/flip are set by the classifier's own recipe.
_LOCATION_KEYS = ('data_dir', 'idx_dir', 'download', 'workers')
_RECIPE_KEYS = ('split', 'random_crop', 'flip')
# Sources whose config has no split: the classifier holds out a fixed share of the examples instead.
_SPLITLESS = ('folder', 'synthetic')
HOLDOUT_FRACTION = 0.1
_LOAD_CHUNK = 4096


class CacheMismatch(ValueError):
  """A cache entry whose JSON does not describe the request it was looked up for."""


# ---------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------

class SmallCNN(nn.Module):
  """conv3x3 + ReLU + 2x2 average pool per stage, then a ReLU dense layer (the features) and the logits.

  Average pools, not max pools: XLA:CPU's max-pool gradient (select-and-scatter) doubled the training
  time for no accuracy that mattered here. Stages beyond `widths` (at its last width) are added until
  the map is at most 4 px, so a 256 px source does not get a 65k-wide dense layer.
  """
  num_classes: int
  widths: tuple[int, ...] = (16, 32, 64)
  feature_dim: int = 128

  def stage_widths(self, image_size: int) -> tuple[int, ...]:
    extra = max(0, math.ceil(math.log2(max(image_size, 1) / 4)) - len(self.widths))
    return tuple(self.widths) + (self.widths[-1],) * extra

  @nn.compact
  def __call__(self, images):
    if images.dtype == jnp.uint8:
      x = images.astype(jnp.float32) / 255.0
    else:
      x = images.astype(jnp.float32)
    x = 2.0 * x - 1.0
    for w in self.stage_widths(images.shape[1]):
      x = nn.relu(nn.Conv(w, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), (2, 2)) if min(x.shape[1:3]) >= 2 else x
    features = nn.relu(nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(features), features


@functools.lru_cache(maxsize=None)
def _apply_fn(model: SmallCNN):
  # One compilation per network and batch shape. The CPU options that speed up the sampler (YNN fusion
  # off) make these small convolutions ~2x faster too.
  opts = inference_compiler_options()
  fn = lambda params, images: model.apply({'params': params}, images)
  return jax.jit(fn, compiler_options=opts) if opts else jax.jit(fn)


# ---------------------------------------------------------------------------------------------------
# The trained classifier
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ProxyClassifier:
  """A trained SmallCNN with what it was trained on. `name` is what metrics are called after
  (`fd_<name>`); `key` names its cache entry and identifies the exact network."""
  name: str
  key: str
  params: Any
  info: dict
  model: SmallCNN
  from_cache: bool = False

  @property
  def accuracy(self) -> float:
    """Test-split accuracy measured when the classifier was trained."""
    return float(self.info['test_accuracy'])

  @property
  def image_size(self) -> int:
    return int(self.info['request']['image_size'])

  @property
  def num_classes(self) -> int:
    return self.model.num_classes

  @property
  def feature_dim(self) -> int:
    return self.model.feature_dim

  def check_images(self, images, what: str = 'images') -> None:
    """ValueError naming `what` unless images are (N, S, S, 3) uint8, or float in [0, 1], at S = image_size."""
    s = self.image_size
    if len(images.shape) != 4 or tuple(images.shape[1:]) != (s, s, 3):
      raise ValueError(f'{what}: the proxy classifier {self.key} takes RGB images of {s}x{s} (N, {s}, {s}, 3), '
                       f'got shape {tuple(images.shape)}')
    check_images(images, what)  # Dtype and range, as for the FID network.

  def check_labels(self, labels, n: int, what: str = 'labels') -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f'{what}: expected {n} integer class labels, got {labels.dtype} {labels.shape}')
    if n and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise ValueError(f'{what}: labels must lie in [0, {self.num_classes}), found [{labels.min()}, '
                       f'{labels.max()}]')
    return labels

  def outputs(self, images, *, batch_size: int = 256, what: str = 'images') -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, classes), features (N, feature_dim)) as float32 NumPy, batch by batch.

    Every batch has the same shape (the last one padded), so one compilation serves any N.
    """
    self.check_images(images, what)
    if batch_size < 1:
      raise ValueError(f'batch_size must be positive, got {batch_size}')
    images = np.asarray(images)
    n = images.shape[0]
    b = min(batch_size, n)
    fn = _apply_fn(self.model)
    logits, feats = [], []
    for start in range(0, n, b):
      chunk = images[start:start + b]
      m = chunk.shape[0]
      if m < b:
        chunk = np.concatenate([chunk, np.zeros((b - m,) + chunk.shape[1:], chunk.dtype)])
      lg, f = fn(self.params, chunk)
      logits.append(np.asarray(lg)[:m])
      feats.append(np.asarray(f)[:m])
    return np.concatenate(logits), np.concatenate(feats)

  def features(self, images, *, batch_size: int = 256) -> np.ndarray:
    """(N, feature_dim) float32 penultimate features."""
    return self.outputs(images, batch_size=batch_size)[1]

  def predict(self, images, *, batch_size: int = 256) -> np.ndarray:
    """(N,) int32 predicted classes."""
    return np.argmax(self.outputs(images, batch_size=batch_size)[0], axis=-1).astype(np.int32)


def agreement(predicted, labels) -> float:
  """Share of predictions equal to their labels: the test accuracy and the class consistency are both
  this one computation."""
  predicted, labels = np.asarray(predicted), np.asarray(labels)
  return float(np.count_nonzero(predicted == labels)) / float(len(labels))


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------

def _as_dict(data_config) -> dict:
  if hasattr(data_config, 'to_dict'):
    return data_config.to_dict()
  if hasattr(data_config, 'keys'):
    return {k: data_config[k] for k in data_config.keys()}
  raise TypeError(f'config.data must be a dict or ConfigDict, got {type(data_config).__name__}')


def _load_arrays(data: dict, image_size: int, split: str | None) -> tuple[np.ndarray, np.ndarray, int]:
  """(uint8 images (N, S, S, 3), int32 labels, num_classes) of one split through the data pipeline.

  The pipeline's own preprocessing with `train=False` (resize, centre crop, no flip), so real images
  are exactly what the generator's data looks like less the random crop; a random crop (resize_ratio
  > 1) shifts by at most (resize_ratio - 1) * S / 2 px, which the pooled features barely see. Read in
  chunks of one global batch: every example once, in the order of the seed-0 permutation.
  """
  cfg = dict(data, random_crop=False, flip=False)
  if split is not None:
    cfg['split'] = split
  source = pipeline.build_source(cfg, image_size, train=False)
  n = source.num_examples
  images = np.empty((n, image_size, image_size, 3), np.uint8)
  labels = np.empty((n,), np.int32)
  for start in range(0, n, _LOAD_CHUNK):
    stop = min(start + _LOAD_CHUNK, n)
    x, y = source.batch(0, 0, n, rows=slice(start, stop))
    # The pipeline maps uint8 pixels p to p / 127.5 - 1, so this recovers them exactly.
    images[start:stop] = np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
    labels[start:stop] = y
  return images, labels, source.num_classes


def load_split(data_config, image_size: int, which: str, *, train_split: str = 'train',
               test_split: str = 'test') -> tuple[np.ndarray, np.ndarray, int]:
  """(uint8 images, int32 labels, num_classes) of the classifier's 'train' or 'test' set.

  For sources with splits these are `train_split` and `test_split`; 'folder' and 'synthetic' have
  none, so their last HOLDOUT_FRACTION (of the fixed seed-0 order) is the test set.
  """
  if which not in ('train', 'test'):
    raise ValueError(f"which must be 'train' or 'test', got {which!r}")
  data = _as_dict(data_config)
  if data.get('source') in _SPLITLESS:
    images, labels, classes = _load_arrays(data, image_size, None)
    cut = len(images) - max(1, int(round(HOLDOUT_FRACTION * len(images))))
    if cut < 1:
      raise ValueError(f'config.data.source={data["source"]!r}: {len(images)} example(s) are too few to '
                       'hold out a test set for the proxy classifier')
    part = slice(0, cut) if which == 'train' else slice(cut, None)
    return images[part], labels[part], classes
  return _load_arrays(data, image_size, train_split if which == 'train' else test_split)


def held_out_images(classifier: ProxyClassifier, data_config) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images, int32 labels) of the classifier's test set: the real images for the proxy metrics."""
  r = classifier.info['request']
  images, labels, _ = load_split(data_config, r['image_size'], 'test', train_split=r['train_split'],
                                 test_split=r['test_split'])
  return images, labels


# ---------------------------------------------------------------------------------------------------
# Request, name and cache
# ---------------------------------------------------------------------------------------------------

def dataset_name(data_config) -> str:
  """A short identifier of the dataset for metric names: 'fashion_mnist', 'digits', a TFDS name, a
  folder's base name."""
  data = _as_dict(data_config)
  source = data.get('source')
  if source == 'tfds':
    raw = str(data.get('name') or 'tfds').split(':')[0].split('/')[0]
  elif source == 'folder':
    raw = files.basename(files.normpath(str(data.get('path') or 'folder')))
  else:
    raw = str(source)
  return re.sub(r'[^a-z0-9]+', '_', raw.lower()).strip('_') or 'data'


def make_request(data_config, image_size: int, *, seed: int = 0, epochs: int = 4, batch_size: int = 64,
                 learning_rate: float = 2e-3, widths: tuple[int, ...] = (16, 32, 64), feature_dim: int = 128,
                 max_train_examples: int | None = None, train_split: str = 'train',
                 test_split: str = 'test') -> dict:
  """Everything that determines the trained classifier, as JSON-able values (the cache key digests it)."""
  data = _as_dict(data_config)
  if data.get('source') not in pipeline.SOURCES:
    raise ValueError(f'config.data.source={data.get("source")!r} must be one of {pipeline.SOURCES}')
  if int(image_size) < 1 or int(epochs) < 1 or int(batch_size) < 1 or not float(learning_rate) > 0:
    raise ValueError(f'image_size={image_size}, epochs={epochs}, batch_size={batch_size} and '
                     f'learning_rate={learning_rate} must be positive')
  if max_train_examples is not None and int(max_train_examples) < 1:
    raise ValueError(f'max_train_examples={max_train_examples} must be >= 1 or None')
  # Defaults filled in, so {'source': 'digits'} and the same with resize_ratio=1.125 are one request.
  full = {k: v if data.get(k) is None else data.get(k) for k, v in pipeline.DEFAULTS.items()}
  flip = full['flip']
  identity = {k: v for k, v in sorted(full.items()) if k not in _LOCATION_KEYS + _RECIPE_KEYS}
  identity['resize_ratio'] = float(identity['resize_ratio'])
  return {
      'kind': KIND,
      'recipe_version': RECIPE_VERSION,
      'data': json.loads(json.dumps(identity, default=str)),
      'image_size': int(image_size),
      'train_split': str(train_split),
      'test_split': str(test_split),
      'network': {'arch': 'cnn', 'widths': [int(w) for w in widths], 'feature_dim': int(feature_dim)},
      'training': {'seed': int(seed), 'epochs': int(epochs), 'batch_size': int(batch_size),
                   'learning_rate': float(learning_rate),
                   'max_train_examples': None if max_train_examples is None else int(max_train_examples),
                   # The generator's pipeline flips unless config.data.flip is False, so by default
                   # the classifier learns mirrored images as well.
                   'flip': True if flip is None else bool(flip)},
  }


def cache_key(request: dict) -> tuple[str, str]:
  """(name, key): e.g. ('cnn_fashion_mnist', 'cnn_fashion_mnist_32px_3f2a...')."""
  digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:12]
  name = f'{request["network"]["arch"]}_{dataset_name(request["data"])}'
  return name, f'{name}_{request["image_size"]}px_{digest}'


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with files.open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def _model(request: dict, num_classes: int) -> SmallCNN:
  net = request['network']
  return SmallCNN(num_classes=int(num_classes), widths=tuple(net['widths']), feature_dim=int(net['feature_dim']))


def load(entry_dir: str, request: dict | None = None) -> ProxyClassifier:
  """The classifier cached in `entry_dir`; CacheMismatch when `request` is given and differs from its JSON."""
  info_path, params_path = files.join(entry_dir, INFO_FILE), files.join(entry_dir, PARAMS_FILE)
  for path in (info_path, params_path):
    if not files.isfile(path):
      raise FileNotFoundError(f'proxy classifier cache {entry_dir} has no {files.basename(path)}; delete '
                              'the directory to retrain')
  try:
    info = files.read_json(info_path)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: the file's own bytes, not a request.
    raise CacheMismatch(f'{info_path} is not a proxy classifier description (not JSON: {e}); delete '
                        f'{entry_dir} to retrain') from None
  if not isinstance(info, dict):  # Valid JSON of another shape (a list, a number) has no .get.
    what = {list: 'an array', str: 'a string', bool: 'a boolean', type(None): 'null'}.get(type(info), 'a number')
    raise CacheMismatch(f'{info_path} is not a proxy classifier description (it holds {what}, not a JSON '
                        f'object); delete {entry_dir} to retrain')
  if info.get('kind') != KIND:
    raise CacheMismatch(f'{info_path} is not a proxy classifier description (kind={info.get("kind")!r})')
  if request is not None and info.get('request') != request:
    diff = sorted(k for k in set(request) | set(info.get('request') or {})
                  if request.get(k) != (info.get('request') or {}).get(k))
    raise CacheMismatch(f'{info_path} describes another classifier than the one requested (differing: '
                        f'{diff}); it was edited or written by another version. Delete {entry_dir} to '
                        'retrain it')
  if _sha256(params_path) != info.get('params_sha256'):
    raise CacheMismatch(f'{params_path} does not match the SHA-256 recorded in {info_path}; delete '
                        f'{entry_dir} to retrain')
  model = _model(info['request'], info['num_classes'])
  template = _param_shapes(model, int(info['request']['image_size']))
  params = flax.serialization.from_bytes(template, files.read_bytes(params_path))
  params = jax.tree_util.tree_map(np.asarray, params)
  return ProxyClassifier(name=info['name'], key=info['key'], params=params, info=info, model=model,
                         from_cache=True)


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------

def _param_shapes(model: SmallCNN, image_size: int):
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)['params']


def _init_params(model: SmallCNN, image_size: int, seed: int):
  """LeCun-normal kernels (Flax's default scale, 1 / fan_in) and zero biases, drawn by NumPy.

  XLA:CPU takes about a second to compile each of Flax's truncated-normal initialisers, longer than
  training the test-sized network; NumPy's generator costs nothing and is as deterministic.
  """
  rng = np.random.default_rng([seed, 0x1417])

  def draw(path, leaf):
    if getattr(path[-1], 'key', None) != 'kernel':
      return np.zeros(leaf.shape, np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, _param_shapes(model, image_size))


@functools.lru_cache(maxsize=8)
def _optimizer_and_step(model: SmallCNN, learning_rate: float, total_steps: int):
  """Adam with a cosine decay to 0 over `total_steps`, and its jitted update step (kept, so that training
  the same network again does not compile again)."""
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, total_steps))

  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits, _ = model.apply({'params': p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opts = inference_compiler_options()  # YNN fusion off on CPU: ~2x faster for these convolutions.
  return tx, jax.jit(step, donate_argnums=(0, 1), **({'compiler_options': opts} if opts else {}))


def _train_params(model: SmallCNN, images: np.ndarray, labels: np.ndarray, training: dict) -> Any:
  """`epochs` passes of full batches, a fresh permutation (and fresh flips) per epoch."""
  seed, epochs, bs = training['seed'], training['epochs'], training['batch_size']
  n = len(images)
  bs = min(bs, n)
  steps_per_epoch = n // bs
  tx, step = _optimizer_and_step(model, float(training['learning_rate']), epochs * steps_per_epoch)
  params = _init_params(model, images.shape[1], seed)
  opt_state = tx.init(params)
  rng = np.random.default_rng([seed, 0xC1A5])
  for epoch in range(epochs):
    t0 = time.time()
    order = rng.permutation(n)
    flips = rng.random(n) < 0.5 if training['flip'] else None
    for i in range(steps_per_epoch):
      idx = order[i * bs:(i + 1) * bs]
      x = images[idx]
      if flips is not None:
        x = np.where(flips[idx][:, None, None, None], x[:, :, ::-1], x)
      params, opt_state, loss = step(params, opt_state, x, labels[idx])
    logging.info('proxy classifier: epoch %d/%d, last loss %.4f, %.1fs', epoch + 1, epochs, float(loss),
                 time.time() - t0)
  return jax.tree_util.tree_map(np.asarray, params)


def train(request: dict, data_config) -> ProxyClassifier:
  """Trains the classifier that `request` (from make_request) describes; nothing is written."""
  t0 = time.time()
  s = request['image_size']
  kw = {'train_split': request['train_split'], 'test_split': request['test_split']}
  train_x, train_y, num_classes = load_split(data_config, s, 'train', **kw)
  test_x, test_y, _ = load_split(data_config, s, 'test', **kw)
  limit = request['training']['max_train_examples']
  if limit is not None:
    train_x, train_y = train_x[:limit], train_y[:limit]
  t_data = time.time() - t0
  name, key = cache_key(request)
  model = _model(request, num_classes)
  params = _train_params(model, train_x, train_y, request['training'])
  info = {'kind': KIND, 'name': name, 'key': key, 'request': request, 'num_classes': int(num_classes),
          'num_train_examples': int(len(train_x)), 'num_test_examples': int(len(test_x)),
          'epochs': request['training']['epochs'], 'feature_dim': model.feature_dim}
  clf = ProxyClassifier(name=name, key=key, params=params, info=info, model=model)
  predicted = clf.predict(test_x)
  info['test_correct'] = int(np.count_nonzero(predicted == test_y))
  info['test_accuracy'] = agreement(predicted, test_y)
  info['data_seconds'] = round(t_data, 2)
  info['train_seconds'] = round(time.time() - t0 - t_data, 2)
  return clf


def save(clf: ProxyClassifier, cache_dir: str) -> bool:
  """Writes clf to cache_dir/<key>/ through a temporary directory renamed into place. False when another
  process renamed its copy there first (then that entry is the cache and this one is dropped). In a
  bucket, which cannot rename, the entry is written in place with its JSON last: `load` requires it and
  checks the parameters against the hash it records, so an entry cut short is never read."""
  final = files.join(cache_dir, clf.key)
  data = flax.serialization.to_bytes(clf.params)
  info = dict(clf.info, params_sha256=hashlib.sha256(data).hexdigest())
  text = json.dumps(info, indent=2, sort_keys=True)
  if files.is_remote(final):
    if files.isfile(files.join(final, INFO_FILE)):
      return False
    files.write_bytes(files.join(final, PARAMS_FILE), data)
    files.write_text(files.join(final, INFO_FILE), text)
    clf.info = info
    return True
  tmp = files.join(cache_dir, f'.{clf.key}.{uuid.uuid4().hex[:8]}')
  try:
    files.makedirs(tmp)
    files.write_bytes(files.join(tmp, PARAMS_FILE), data)
    files.write_text(files.join(tmp, INFO_FILE), text)
    files.rename(tmp, final)
  except OSError:
    files.rmtree(tmp)
    if files.isfile(files.join(final, INFO_FILE)):
      return False
    raise
  clf.info = info
  return True


def train_or_load(data_config, image_size: int, cache_dir: str, *, seed: int = 0, epochs: int = 4,
                  batch_size: int = 64, learning_rate: float = 2e-3, widths: tuple[int, ...] = (16, 32, 64),
                  feature_dim: int = 128, max_train_examples: int | None = None, train_split: str = 'train',
                  test_split: str = 'test') -> ProxyClassifier:
  """The cached classifier of this request, else a newly trained one (then cached).

  `data_config` is config.data (dict or ConfigDict) and `image_size` the generator's resolution.
  Raises CacheMismatch when cache_dir/<key>/ exists but describes another request.
  """
  request = make_request(data_config, image_size, seed=seed, epochs=epochs, batch_size=batch_size,
                         learning_rate=learning_rate, widths=widths, feature_dim=feature_dim,
                         max_train_examples=max_train_examples, train_split=train_split,
                         test_split=test_split)
  _, key = cache_key(request)
  entry = files.join(cache_dir, key)
  if files.isdir(entry):
    clf = load(entry, request)
    logging.info('proxy classifier %s from %s (test accuracy %.4f)', clf.key, entry, clf.accuracy)
    return clf
  clf = train(request, data_config)
  # Every process trained the same classifier (same data, same seed); process 0 alone caches it.
  if multihost.is_main_process() and not save(clf, cache_dir):
    return load(entry, request)
  logging.info('proxy classifier %s trained in %.1fs, test accuracy %.4f, cached in %s', clf.key,
               clf.info['train_seconds'], clf.accuracy, entry)
  return clf
