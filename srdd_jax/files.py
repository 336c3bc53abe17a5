"""Every file the project reads or writes, on the local disk or in a bucket (gs://bucket/path), goes
through this module: etils.epath, the path library Orbax and TFDS use, under one set of functions that
take and return path strings.

Object stores differ from a disk in three ways the callers rely on:
- no rename: an object written in one request appears whole or not at all, so `write_bytes` (and
  everything built on it) writes in place there, and through a temporary renamed into place locally;
  a folder that must appear whole is committed the way Orbax commits a checkpoint on GCS: its files
  first, then a marker (`COMMIT_MARKER`) last, and readers trust only a folder with its marker
  (`committed`);
- no append: `append_text` rewrites the object, which is fine for the small logs it is used for;
- no folders: a folder exists while an object is under its prefix; `makedirs` is a no-op there.

gs:// goes through fsspec (gcsfs), not TensorFlow's file system: TensorFlow's GCS client has its
endpoint compiled in, so it could never be tested against an emulator, while gcsfs (and TensorStore,
which writes Orbax's array data) follow STORAGE_EMULATOR_HOST (TENSORSTORE_GCS_HTTP_URL): the code
tested offline is the code that runs against a real bucket. EPATH_USE_TF=true restores etils' default.
"""
from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import threading
from typing import Any, Iterator

# Read by etils when a gs:// path first picks its backend (then cached): set before any path is made.
os.environ.setdefault('EPATH_USE_TF', 'false')

from etils import epath  # pylint: disable=g-import-not-at-top,wrong-import-position
import fsspec  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

# The file that commits a folder on a store without rename, named as Orbax names its own.
COMMIT_MARKER = 'commit_success.txt'


def is_remote(path) -> bool:
  """Whether `path` names an object store (gs://, s3://, ...) rather than the local disk."""
  s = os.fspath(path)
  return '://' in s and not s.startswith('file://')


def path(p) -> epath.Path:
  return epath.Path(os.fspath(p))


def join(first, *rest) -> str:
  first = os.fspath(first)
  if is_remote(first):
    return posixpath.join(first, *(os.fspath(r) for r in rest))
  return os.path.join(first, *(os.fspath(r) for r in rest))


def basename(p) -> str:
  return posixpath.basename(os.fspath(p).rstrip('/')) if is_remote(p) else os.path.basename(os.fspath(p))


def _remote(s: str, fn) -> str:
  """`fn` of a bucket path's part after the scheme, the scheme kept."""
  scheme, rest = s.split('://', 1)
  return f'{scheme}://{fn(rest)}'


def dirname(p) -> str:
  s = os.fspath(p)
  return _remote(s, lambda rest: posixpath.dirname(rest.rstrip('/'))) if is_remote(s) else os.path.dirname(s)


def absolute(p) -> str:
  """A local path made absolute (what is recorded and handed to Orbax); a bucket path as it is."""
  return os.fspath(p) if is_remote(p) else os.path.abspath(os.fspath(p))


def relpath(p, start) -> str:
  if is_remote(p):
    return posixpath.relpath(os.fspath(p).split('://', 1)[1], os.fspath(start).split('://', 1)[1])
  return os.path.relpath(p, start)


def is_within(p, folder) -> bool:
  a, b = absolute(p).rstrip('/'), absolute(folder).rstrip('/')
  return a == b or a.startswith(b + '/')


def normpath(p) -> str:
  s = os.fspath(p)
  return _remote(s, posixpath.normpath) if is_remote(s) else os.path.normpath(s)


def splitext(p) -> tuple[str, str]:
  return posixpath.splitext(os.fspath(p))


def exists(p) -> bool:
  return path(p).exists()


def isdir(p) -> bool:
  return path(p).is_dir()


def isfile(p) -> bool:
  q = path(p)
  return q.exists() and not q.is_dir()


def listdir(p) -> list[str]:
  """The names in folder `p`, sorted; [] when there is none."""
  q = path(p)
  if not q.is_dir():
    return []
  return sorted(c.name for c in q.iterdir())


def walk(p) -> Iterator[tuple[str, list[str], list[str]]]:
  """(folder, its sub-folders, its files) under `p`, top down, following links on the local disk."""
  if is_remote(p):
    scheme = os.fspath(p).split('://', 1)[0] + '://'
    for root, dirs, files in path(p).walk():
      root = os.fspath(root)  # fsspec gives bucket paths without their scheme.
      yield (root if root.startswith(scheme) else scheme + root), sorted(dirs), sorted(files)
  else:
    for root, dirs, files in os.walk(p, followlinks=True):
      yield root, dirs, files


def realpath(p) -> str:
  return os.fspath(p) if is_remote(p) else os.path.realpath(p)


def holds_files(p) -> bool:
  return any(files for _, _, files in walk(p))


def makedirs(p) -> None:
  """Folder `p` and its parents (nothing to make in a bucket, where folders are name prefixes)."""
  if not is_remote(p):
    os.makedirs(p, exist_ok=True)


def remove(p, missing_ok: bool = True) -> None:
  try:
    path(p).unlink()
  except FileNotFoundError:
    if not missing_ok:
      raise


def rmtree(p) -> None:
  """Folder (or file) `p` and all under it; nothing when it does not exist."""
  q = path(p)
  if not q.exists():
    return
  if q.is_dir():
    q.rmtree()
  else:
    q.unlink()


def rename(src, dst) -> None:
  """`src` (a file or folder) moved to `dst`, which must not exist. Atomic on the local disk; in a
  bucket, copies then deletes (callers that need atomicity commit with a marker instead)."""
  if is_remote(src):
    copytree(src, dst) if isdir(src) else copy(src, dst)
    rmtree(src)
  else:
    os.replace(src, dst)


def copy(src, dst) -> None:
  path(src).copy(path(dst), overwrite=True)


def copytree(src, dst, last: str | None = None) -> None:
  """Every file under `src` copied to the same place under `dst`; the file named `last` (a commit
  marker) copied after all others."""
  tail = []
  for root, _, names in walk(src):
    for name in names:
      rel = relpath(join(root, name), src)
      target = join(dst, rel)
      if name == last and relpath(root, src) in ('.', ''):
        tail.append((join(root, name), target))
        continue
      makedirs(dirname(target))
      copy(join(root, name), target)
  for s, t in tail:
    copy(s, t)


def size_and_mtime(p) -> tuple[int, int] | None:
  """(bytes, modification time in ns) of file `p`, or None."""
  try:
    if not is_remote(p):
      st = os.stat(p)
      return st.st_size, st.st_mtime_ns
    st = path(p).stat()
    return int(st.length or 0), int(st.mtime) * 10**9
  except (OSError, FileNotFoundError):
    return None


def free_bytes(p) -> int | None:
  """Free space on the file system of local folder `p` (or its parent); None where that cannot be
  measured (a bucket, a mount without statvfs)."""
  if is_remote(p):
    return None
  try:
    st = os.statvfs(p if os.path.isdir(p) else os.path.dirname(p) or '.')
  except OSError:
    return None
  return st.f_bavail * st.f_frsize


def open(p, mode: str = 'r'):  # pylint: disable=redefined-builtin
  """A file object on `p` (text or binary). Writing to a bucket object commits it at close()."""
  return path(p).open(mode)


def read_bytes(p) -> bytes:
  return path(p).read_bytes()


def read_text(p) -> str:
  return path(p).read_text()


def read_json(p) -> Any:
  return json.loads(read_text(p))


def write_bytes(p, data: bytes) -> None:
  """`data` at `p`, all or nothing: a reader (or a run cut short) sees the old file or the new one.
  On the disk through a temporary renamed into place; a bucket object is atomic by itself."""
  if is_remote(p):
    path(p).write_bytes(data)
    return
  makedirs(os.path.dirname(p) or '.')
  tmp = f'{p}.tmp'
  with _local_open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, p)


def _local_open(p, mode):
  return io.open(p, mode)  # The builtin, which this module's `open` shadows.


def create_exclusive(p, data: bytes) -> bool:
  """Writes `data` at `p` only if nothing is there (O_EXCL on the disk; an if-generation-match-0
  precondition on GCS); False when something is. Stores without preconditions (and some emulators,
  which ignore them) may still let a racing writer win: callers read back what they wrote."""
  if not is_remote(p):
    try:
      fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    return True
  if exists(p):
    return False
  fs, where = fsspec.core.url_to_fs(os.fspath(p))
  try:
    if os.fspath(p).startswith('gs://'):
      fs.pipe_file(where, data, mode='create')
    else:
      fs.pipe_file(where, data)
  except FileExistsError:
    return False
  return True


def write_text(p, text: str) -> None:
  write_bytes(p, text.encode())


def write_json(p, obj, indent: int | None = 1) -> None:
  write_text(p, json.dumps(obj, indent=indent, default=float))


def append_text(p, text: str) -> None:
  """`text` added at the end of `p` (created when missing). Objects cannot grow: a bucket's is
  rewritten whole (the metrics logs this serves stay small)."""
  if is_remote(p):
    old = read_bytes(p) if exists(p) else b''
    path(p).write_bytes(old + text.encode())
    return
  with _local_open(p, 'a') as f:
    f.write(text)


def np_load(p, **kwargs):
  """np.load of `p`; .npz files are read whole first from a bucket (np.load needs to seek)."""
  if is_remote(p):
    return np.load(io.BytesIO(read_bytes(p)), **kwargs)
  return np.load(p, **kwargs)


def save_npz(p, compressed: bool = False, **arrays) -> None:
  """`arrays` as an .npz at `p` (the name kept as given), all or nothing."""
  buf = io.BytesIO()
  (np.savez_compressed if compressed else np.savez)(buf, **arrays)
  write_bytes(p, buf.getvalue())


def save_image(p, image, **kwargs) -> None:
  """An image (a uint8 array or a PIL image) at `p`, its format from the name, all or nothing."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  if not isinstance(image, Image.Image):
    image = Image.fromarray(np.asarray(image))
  buf = io.BytesIO()
  image.save(buf, format=Image.registered_extensions().get(splitext(p)[1].lower(), 'PNG'), **kwargs)
  write_bytes(p, buf.getvalue())


def load_image(p):
  """The PIL image at `p`, read whole (the file is closed on return)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  im = Image.open(io.BytesIO(read_bytes(p)))
  im.load()
  return im


def committed(folder) -> bool:
  """Whether `folder` is complete: locally, that it exists (it was renamed into place whole); in a
  bucket, that its commit marker was written (last)."""
  if is_remote(folder):
    return exists(join(folder, COMMIT_MARKER))
  return exists(folder)


def commit(folder) -> None:
  """Marks bucket folder `folder` complete, after everything in it is written (a no-op locally)."""
  if is_remote(folder):
    write_text(join(folder, COMMIT_MARKER), 'committed\n')


def probe(p, timeout: float = 15.0) -> str | None:
  """Why the store of bucket path `p` cannot be used (no credentials, no answer within `timeout`
  seconds, an error listing it), or None when it answers. Cheap: one listing, in a thread so that a
  client retrying an unreachable host cannot hold the caller past `timeout`. Local paths: None."""
  s = os.fspath(p)
  if not is_remote(s):
    return None
  if s.startswith('gs://') and not os.environ.get('STORAGE_EMULATOR_HOST'):
    auth_log = logging.getLogger('google.auth')  # Its warning of each way it tried: our line says it.
    level = auth_log.level
    auth_log.setLevel(logging.ERROR)
    try:
      import google.auth  # pylint: disable=import-outside-toplevel
      google.auth.default()
    except Exception as e:  # pylint: disable=broad-except  # DefaultCredentialsError, a bad key file
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      return (f'no Google Cloud credentials ({first.split(". ")[0]}); run `gcloud auth application-default '
              'login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service account key')
    finally:
      auth_log.setLevel(level)
  result = {}

  def look():
    try:
      fs, where = fsspec.core.url_to_fs(s)
      bucket, _, prefix = where.partition('/')
      if s.startswith('gs://'):  # One page of one object: a bucket of any size answers at once.
        fs.call('GET', 'b/{}/o', bucket, maxResults=1, prefix=prefix, json_out=True)
      else:
        fs.ls(where, detail=False, refresh=True)
      result['ok'] = True
    except Exception as e:  # pylint: disable=broad-except
      result['error'] = e

  thread = threading.Thread(target=look, daemon=True, name='srdd-store-probe')
  thread.start()
  thread.join(timeout)
  if 'ok' in result:
    return None
  if 'error' in result:
    e = result['error']
    if isinstance(e, FileNotFoundError) and s.startswith('gs://'):
      return f'bucket {s.split("://", 1)[1].split("/", 1)[0]!r} does not exist'
    if isinstance(e, FileNotFoundError):
      return None  # The store answered: nothing is there yet.
    return f'{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ""}'
  return f'no answer from the store within {timeout:.0f} s (no network?)'
