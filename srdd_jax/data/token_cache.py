"""Token caches: a data set's token ids under a frozen tokenizer, written once, read by training.

Layout of a cache directory:
  manifest.json            written last (its presence means the cache is complete): tokenizer hash (of
                           its architecture and weights), record and checkpoint, patch_nums, vocab size,
                           counts, flips, data description, shards
  shard_00000.npz          ids (n, F, L) uint16/int32 (F = 2 with the flipped copy, else 1), labels (n,),
  shard_00001.npz ...      index (n,): example index in the source's order, and `writer`: the JSON of
                           what wrote it (tokenizer hash, patch_nums, flips, shard size, example count)

Shards are written whole under a temporary name and renamed, so a killed run leaves complete shards
only; running `--mode=tokenize` again keeps those written by the same tokenizer and settings (each shard
records them) and refuses shards of any other, so a cache never mixes tokenizers. A complete cache is never
overwritten. Reading follows the same order as the image sources (one permutation per epoch from
(seed, epoch)); with flips cached, the copy of a position is drawn from (seed, step, position), so a
resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import time
import zipfile

import jax
import numpy as np
from absl import logging

from srdd_jax import files
from srdd_jax.data.source import DataError, default_workers, Unreadable, augmentation_draws, row_positions
from srdd_jax.parallel.workdir import describe_change

MANIFEST = 'manifest.json'
# 3: the tokenizer hash covers its architecture and its weights (convert.loading.tokenizer_identity), and
# the manifest records both. 2: every shard records its writer; the hash covers the weights only (read,
# the architecture unchecked). 1 (no record) is still read, unverified.
FORMAT = 3


def params_hash(params) -> str:
  """SHA-256 of a parameter tree (names, dtypes, shapes and bytes): the identity of a tokenizer's weights
  (its architecture is the other half of its identity: convert.loading.tokenizer_identity)."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _shard_path(directory: str, i: int) -> str:
  return files.join(directory, f'shard_{i:05d}.npz')


def write(directory: str, source, encode, *, tokenizer_hash: str, tokenizer_checkpoint: str, patch_nums,
          vocab_size: int, flips: bool, batch_size: int, shard_size: int, process_index: int = 0,
          process_count: int = 1, sync=lambda name: None, max_examples: int = 0,
          tokenizer: dict | None = None) -> dict:
  """Tokenizes every example of `source` (in index order, preprocessed without randomness), or its first
  `max_examples` (> 0), into `directory`. `encode(pixels (n, S, S, 3) uint8, or float32 in [-1, 1] for
  synthetic images) -> ids (n, L)`. `tokenizer_hash`: the tokenizer's identity hash (`tokenizer`, its
  record: weights hash and architecture, goes into the manifest to say what changed on a mismatch).
  Process p writes the shards i with i % process_count == p; process 0 writes the manifest once all
  shards exist."""
  manifest_path = files.join(directory, MANIFEST)
  if files.exists(manifest_path):
    raise DataError(f'{directory} already holds a complete token cache ({manifest_path}); it is never '
                    'overwritten: choose another config.tokenize.out_dir or delete it yourself')
  if source.random_crop or source.flip:
    raise DataError('the token cache is written from center crops without random flips: build the source '
                    'with train=False')
  files.makedirs(directory)
  n = min(source.num_examples, max_examples) if max_examples > 0 else source.num_examples
  num_shards = math.ceil(n / shard_size)
  dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
  done = todo = 0
  t0, last = time.time(), time.time()
  mine = [i for i in range(num_shards) if i % process_count == process_index]
  pool = concurrent.futures.ThreadPoolExecutor(getattr(source, 'workers', 0) or default_workers(),
                                               thread_name_prefix='srdd-tokenize')
  for i in mine:
    path = _shard_path(directory, i)
    lo, hi = i * shard_size, min(n, (i + 1) * shard_size)
    writer = {'tokenizer_hash': tokenizer_hash, 'patch_nums': [int(p) for p in patch_nums], 'flips': bool(flips),
              'shard_size': int(shard_size), 'count': n, 'examples': [lo, hi]}
    if files.exists(path):  # Written by an earlier, interrupted run: complete by construction ...
      _check_writer(path, writer)  # ... but perhaps by another tokenizer or with other settings.
      done += 1
      continue
    ids, labels, index = [], [], []
    for b in range(lo, hi, batch_size):
      idx = list(range(b, min(hi, b + batch_size)))
      images, labs = _load(source, idx, pool)
      views = [images] + ([images[:, :, ::-1]] if flips else [])
      pad = batch_size - len(idx)  # The last batch is padded to the compiled size, then trimmed.
      enc = [np.asarray(encode(np.concatenate([v, np.repeat(v[-1:], pad, 0)]) if pad else v))[:len(idx)]
             for v in views]
      ids.append(np.stack(enc, axis=1).astype(dtype))
      labels.append(labs)
      index.append(np.asarray(idx, np.int64))
      todo += len(idx)
      if time.time() - last > 30:
        rate = todo / (time.time() - t0)
        logging.info('tokenize: %d/%d examples of process %d (%.1f img/s, ETA %.0fs)', todo,
                     sum(min(n, (j + 1) * shard_size) - j * shard_size for j in mine), process_index, rate,
                     (n / process_count - todo) / max(rate, 1e-9))
        last = time.time()
    files.save_npz(path, ids=np.concatenate(ids), labels=np.concatenate(labels).astype(np.int32),
                   index=np.concatenate(index), writer=np.array(json.dumps(writer)))
  pool.shutdown()
  seconds = time.time() - t0
  sync('token-cache-shards')
  manifest = {
      'format': FORMAT, 'tokenizer_hash': tokenizer_hash, 'tokenizer_checkpoint': tokenizer_checkpoint,
      'tokenizer': tokenizer,
      'patch_nums': [int(p) for p in patch_nums], 'vocab_size': int(vocab_size), 'count': n,
      'num_classes': int(source.num_classes), 'flips': bool(flips), 'image_size': int(source.image_size),
      'data': source.description, 'source_examples': int(source.num_examples), 'shard_size': int(shard_size), 'num_shards': num_shards,
      'skipped': int(source.skipped), 'created': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
  }
  if process_index == 0:
    missing = [i for i in range(num_shards) if not files.exists(_shard_path(directory, i))]
    if missing:
      raise DataError(f'{directory}: shards {missing[:5]} are missing after tokenization')
    files.write_json(manifest_path, manifest)  # Last: the manifest is the cache's commit.
  sync('token-cache-manifest')
  return {'examples': todo, 'shards_written': len(mine) - done, 'shards_kept': done,
          'seconds': round(seconds, 2), 'images_per_s': round(todo * (2 if flips else 1) / max(seconds, 1e-9), 2)}


def _shard_writer(path: str) -> dict | None:
  with files.np_load(path) as z:
    return json.loads(str(z['writer'])) if 'writer' in z.files else None


def _check_writer(path: str, expected: dict) -> None:
  """A shard left by an earlier run is kept only if the same tokenizer and settings wrote it."""
  got = _shard_writer(path)
  if got == expected:
    return
  if got is None:
    why = 'it records no writer (an older version wrote it)'
  else:
    diff = [k for k in expected if got.get(k) != expected[k]]
    why = '; '.join(f'{k} {got.get(k)!r} there, {expected[k]!r} now' for k in diff)
    if 'tokenizer_hash' in diff:
      why = (f'it was written by another tokenizer (hash {str(got.get("tokenizer_hash"))[:12]}, this run\'s '
             f'{expected["tokenizer_hash"][:12]})') + ('; ' + why if len(diff) > 1 else '')
  raise DataError(f'{path} is left from an earlier tokenize run that does not match this one: {why}. A '
                  'cache never mixes tokenizers or settings: choose another config.tokenize.out_dir, or '
                  'delete that directory\'s shards')


def _check_tokenizer(m: dict, tokenizer: dict, directory: str, key: str) -> None:
  """The manifest `m` of the cache at `directory` against the identity of the tokenizer that reads it: a
  DataError naming what differs (the architecture's keys, or the weights) and both tokenizers."""
  if m['format'] < 3:  # Its hash is of the weights alone.
    if m['tokenizer_hash'] == tokenizer['weights']:
      logging.warning('%s: a format-%d cache records its tokenizer\'s weights only; their architecture (model.json) '
                      'cannot be checked (write it again with --mode=tokenize to get the check)', directory,
                      m['format'])
      return
    why = f'weights {m["tokenizer_hash"][:12]} there, {tokenizer["weights"][:12]} now'
  elif m['tokenizer_hash'] == tokenizer['hash']:
    return
  else:
    recorded = m.get('tokenizer') or {}
    if recorded.get('architecture') not in (None, tokenizer['architecture']):
      why = 'architecture ' + describe_change(recorded['architecture'], tokenizer['architecture'])
    else:
      why = f'weights {str(recorded.get("weights"))[:12]} there, {tokenizer["weights"][:12]} now'
  raise DataError(f'{key}={directory!r} was written by another tokenizer ({m.get("tokenizer_checkpoint") or "?"}, '
                  f'hash {m["tokenizer_hash"][:12]}) than config.tokenizer.checkpoint ({tokenizer.get("source", "?")}, '
                  f'hash {tokenizer["hash"][:12]}): {why}; write a cache with this tokenizer (--mode=tokenize, another '
                  'config.tokenize.out_dir) or use the tokenizer it was written with')


def _load(source, indices, pool=None):
  """Examples by index as decoded (uint8 pixels), without augmentation (the source decides nothing random
  with train=False), read by `pool`'s threads when given. An unreadable example is replaced by the next
  readable one, as the image sources do."""
  def one(i):
    for t in range(source.num_examples):
      j = (i + t) % source.num_examples
      try:
        return source.decode(j, 0, 0, 0)
      except Unreadable as e:
        source.mark_bad(j, str(e))
    raise DataError(f'{source.description}: no readable example')

  pairs = list(pool.map(one, indices) if pool is not None else map(one, indices))
  return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs], np.int32)


class TokenCache:
  """A complete cache, checked against the tokenizer and the patch_nums the training run uses: `tokenizer`
  its identity (convert.loading.tokenizer_identity, or a function giving it), or `tokenizer_hash` the hash
  the manifest must hold (or a function giving it)."""

  def __init__(self, directory: str, *, tokenizer_hash: str | None = None, patch_nums=None,
               key: str = 'config.data.token_cache', tokenizer=None):
    path = files.join(directory, MANIFEST)
    if not files.isdir(directory):
      raise DataError(f'{key}={directory!r} does not exist (write it with --mode=tokenize)')
    if not files.exists(path):
      raise DataError(f'{key}={directory!r} has no {MANIFEST}: the cache is incomplete; run --mode=tokenize '
                      'again to finish it')
    try:
      self.manifest = m = files.read_json(path)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors.
      raise DataError(f'{key}={directory!r}: {path} is unreadable ({type(e).__name__}: {e}); write the cache '
                      'again with --mode=tokenize into a new directory') from None
    if not isinstance(m, dict):
      raise DataError(f'{key}={directory!r}: {path} is not a token-cache manifest')
    if m.get('format') not in (1, 2, FORMAT):
      raise DataError(f'{key}: {path} has format {m.get("format")}, this version reads 1 to {FORMAT}')
    if m['format'] == 1:
      logging.warning('%s: a format-1 cache records no writer per shard; its shards cannot be checked '
                      'against its tokenizer (write it again with --mode=tokenize to get the checks)', directory)
    if patch_nums is not None and tuple(m['patch_nums']) != tuple(patch_nums):
      raise DataError(f'{key}={directory!r} holds tokens for patch_nums {tuple(m["patch_nums"])}, the model '
                      f'uses {tuple(patch_nums)}')
    if callable(tokenizer_hash):  # Computed only for a cache that exists (hashing may need an init).
      tokenizer_hash = tokenizer_hash()
    if callable(tokenizer):
      tokenizer = tokenizer()
    if tokenizer is not None:
      _check_tokenizer(m, tokenizer, directory, key)
    if tokenizer_hash is not None and m['tokenizer_hash'] != tokenizer_hash:
      raise DataError(f'{key}={directory!r} was written by another tokenizer (hash {m["tokenizer_hash"][:12]}, '
                      f'from {m["tokenizer_checkpoint"]!r}) than config.tokenizer.checkpoint '
                      f'(hash {tokenizer_hash[:12]})')
    ids, labels = [], []
    for i in range(m['num_shards']):
      try:
        with files.np_load(_shard_path(directory, i)) as z:
          ids.append(z['ids'])
          labels.append(z['labels'])
          writer = json.loads(str(z['writer'])) if 'writer' in z.files else None
      except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        # A shard cut short (a full disk, a copy interrupted): say which, keep everything as it is.
        raise DataError(f'{key}={directory!r}: shard {_shard_path(directory, i)} is unreadable '
                        f'({type(e).__name__}: {e}); write the cache again with --mode=tokenize into a new '
                        'directory') from None
      if m['format'] >= 2 and (writer is None or writer.get('tokenizer_hash') != m['tokenizer_hash']
                               or writer.get('patch_nums') != list(m['patch_nums'])):
        raise DataError(f'{key}={directory!r}: {_shard_path(directory, i)} was not written by the tokenizer '
                        f'and patch_nums of its manifest (hash {m["tokenizer_hash"][:12]}): the cache is '
                        'inconsistent; write it again with --mode=tokenize into a new directory')
    self.ids, self.labels = np.concatenate(ids), np.concatenate(labels)
    if len(self.ids) != m['count']:
      raise DataError(f'{key}={directory!r}: {len(self.ids)} examples in the shards, manifest says {m["count"]}')
    self.num_examples, self.num_classes, self.skipped = m['count'], m['num_classes'], 0
    self.flips = m['flips']
    self.description = f'token cache {directory} ({m["count"]} examples of {m["data"]})'
    self._perms: dict[int, np.ndarray] = {}

  def _perm(self, seed: int, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) >= 4:
        self._perms.pop(next(iter(self._perms)))
      self._perms[epoch] = np.random.default_rng([seed, epoch]).permutation(self.num_examples)
    return self._perms[epoch]

  def batch(self, seed: int, step: int, global_batch: int, rows=None):
    """Rows of the global batch of `step` (None, a slice or spans: source.row_positions): token ids
    (n, L) int32 and labels (n,) int32; the same examples, in the same order, as the image source gives
    for (seed, step)."""
    out_ids, out_labels = [], []
    for p in map(int, row_positions(global_batch, rows)):
      epoch, k = divmod(step * global_batch + p, self.num_examples)
      i = int(self._perm(seed, epoch)[k])
      copy = 0
      if self.flips and augmentation_draws(seed, step, p)[2] < 0.5:
        copy = 1
      out_ids.append(self.ids[i, copy])
      out_labels.append(self.labels[i])
    return np.stack(out_ids).astype(np.int32), np.asarray(out_labels, np.int32)

  def iterator(self, seed: int, start_step: int, global_batch: int, rows=None):
    step = start_step
    while True:
      yield self.batch(seed, step, global_batch, rows)
      step += 1
