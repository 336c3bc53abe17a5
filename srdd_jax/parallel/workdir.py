"""Safety of a workdir: one run at a time, outputs replaced whole or not at all, units of work run once.

One run per workdir. Two runs writing one workdir interleave metrics.jsonl and race inside Orbax saves.
Process 0 of a run holds an OS-level lock (flock) on the workdir directory itself: the kernel releases it
when the process dies, however it dies, and no file can be deleted to get around it (a lock on a lock
*file* can: delete the file and the next run locks a new one). WORKDIR/.srdd.lock only says who holds the
lock, for the message a second run prints. File systems without flock (some network mounts) fall back
to the file alone, created atomically (O_EXCL), with a warning.

A workdir in a bucket (gs://...) has no flock and no process whose death a kernel could see: there
WORKDIR/.srdd.lock is a lease, an object naming its holder and when its hold ends, renewed by a thread
of process 0 while the run lasts. It is created only where no live lease is (if-absent on the store
where it can, then read back after a pause: of two runs that raced, the one whose record is read back
holds it); a lease not renewed for LEASE_SECONDS (its run was killed) is taken over.

Every file here is read and written through srdd_jax.files, so all of this works the same in a bucket,
except where a bucket has no atomic rename: there `Outputs` commits the way Orbax commits a checkpoint
(srdd_jax.files.COMMIT_MARKER).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
import socket
import sys
import threading
import time
import uuid

from absl import logging

from srdd_jax import files
from srdd_jax.config import ConfigError
from srdd_jax.parallel import multihost

LOCK_NAME = '.srdd.lock'
# How long a bucket lease holds without renewal (renewed every quarter of it): how long a killed run
# keeps its workdir from the next one.
LEASE_SECONDS = float(os.environ.get('SRDD_LEASE_SECONDS', 120))


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Exists, owned by someone else.
    return True
  return True


class WorkdirLock:
  """`with WorkdirLock(workdir): ...` holds the workdir for the block (a no-op when `enabled` is False,
  e.g. on processes other than 0 of a multi-process run)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir = workdir
    self.path = files.join(workdir, LOCK_NAME)
    self.enabled = enabled
    self.held = False
    self._fd = None  # The workdir, open and flock-ed while held.
    self._lease = None  # A bucket's: its token and the thread renewing it.

  def _holder(self) -> dict:
    try:
      return files.read_json(self.path)
    except (OSError, ValueError):
      return {}

  def _in_use(self, h: dict) -> ConfigError:
    if files.is_remote(self.workdir) and 'expires' in h:
      until = datetime.datetime.fromtimestamp(h['expires']).isoformat(timespec='seconds')
      gone = f'if that run is gone, its lease {self.path} expires at {until}, unless it is renewed'
    else:
      gone = f'if that run is gone, delete {self.path}'
    return ConfigError(
        f'workdir {self.workdir!r} is in use by process {h.get("pid", "?")} on host {h.get("host", "?")} '
        f'since {h.get("started", "?")} ({h.get("command", "?")}); wait for it to finish or use another '
        f'--workdir ({gone})')

  def _flock(self) -> bool:
    """Takes the OS lock on the workdir; False where the file system has none (then the file decides)."""
    try:
      self._fd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
      raise ConfigError(f'cannot open --workdir={self.workdir!r}: {e.strerror}') from e
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return True
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
        os.close(self._fd)
        self._fd = None
        raise self._in_use(self._holder()) from None
      logging.warning('the file system of %s has no flock (%s): the workdir is held by %s alone',
                      self.workdir, e.strerror, self.path)
      return False

  def acquire(self) -> None:
    if not self.enabled:
      return
    me = {'pid': os.getpid(), 'host': socket.gethostname(),
          'started': datetime.datetime.now().isoformat(timespec='seconds'), 'command': ' '.join(sys.argv)}
    if files.is_remote(self.workdir):
      self._take_lease(me)
      return
    if self._flock():
      # The kernel says nobody holds the workdir: a file left behind is stale, whoever wrote it.
      h = self._holder()
      if h:
        logging.warning('%s was left by process %s on %s, which no longer holds the workdir; taking it over',
                        self.path, h.get('pid', '?'), h.get('host', '?'))
      try:
        write_json(self.path, me)
      except OSError as e:
        self._unlock()
        raise ConfigError(f'cannot write to --workdir={self.workdir!r}: {e.strerror}') from e
      self.held = True
      return
    for _ in range(2):
      try:
        created = files.create_exclusive(self.path, json.dumps(me).encode())
      except OSError as e:
        self._unlock()
        raise ConfigError(f'cannot write to --workdir={self.workdir!r}: {e.strerror}') from e
      if not created:
        h = self._holder()
        if h.get('host') == me['host'] and isinstance(h.get('pid'), int) and not _alive(h['pid']):
          logging.warning('%s was left by process %d, which no longer runs; taking it over', self.path, h['pid'])
          files.remove(self.path)
          continue
        self._unlock()
        raise self._in_use(h) from None
      self.held = True
      return

  def _take_lease(self, me: dict) -> None:
    token = uuid.uuid4().hex
    h = self._holder()
    if h and h.get('expires', 0) > time.time():
      raise self._in_use(h)
    if h:
      logging.warning('%s was left by process %s on %s and has not been renewed since %s; taking it over',
                      self.path, h.get('pid', '?'), h.get('host', '?'),
                      datetime.datetime.fromtimestamp(h.get('expires', 0) - LEASE_SECONDS).isoformat(
                          timespec='seconds'))
    rec = {**me, 'token': token, 'expires': time.time() + LEASE_SECONDS}
    try:
      if h:
        files.write_json(self.path, rec)
      elif not files.create_exclusive(self.path, json.dumps(rec, indent=1).encode()):
        raise self._in_use(self._holder())
    except OSError as e:
      raise ConfigError(f'cannot write to --workdir={self.workdir!r}: {e}') from e
    # Where the store cannot create if absent (or two takeovers of a stale lease raced), the last
    # write wins: the run that reads its own token back after the pause holds the lease.
    time.sleep(min(2.0, LEASE_SECONDS / 20))
    back = self._holder()
    if back.get('token') != token:
      raise self._in_use(back)
    stop = threading.Event()
    thread = threading.Thread(target=self._renew, args=(rec, stop), name='srdd-workdir-lease', daemon=True)
    self._lease = (token, stop, thread)
    self.held = True
    thread.start()

  def _renew(self, rec: dict, stop: threading.Event) -> None:
    while not stop.wait(LEASE_SECONDS / 4):
      try:
        if self._holder().get('token') != rec['token']:
          logging.error('%s was taken by another run: this run no longer holds its workdir', self.path)
          return
        files.write_json(self.path, {**rec, 'expires': time.time() + LEASE_SECONDS})
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('could not renew %s (%s); trying again', self.path, e)

  def _drop_lease(self) -> None:
    token, stop, thread = self._lease
    self._lease = None
    stop.set()
    thread.join(timeout=30)
    try:
      if self._holder().get('token') == token:
        files.remove(self.path)
    except OSError as e:
      logging.warning('could not remove %s (%s): it expires by itself', self.path, e)

  def _unlock(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # Closing the last descriptor releases the flock.
      self._fd = None

  def release(self) -> None:
    if self._lease is not None:
      self._drop_lease()
      self.held = False
    if self.held:
      files.remove(self.path)
      self.held = False
    self._unlock()

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
    return False


# Write errors that are the storage's, not the program's: a full disk, a quota, a file-size limit, a
# read-only mount. Exit status 2 with one line, never a traceback.
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def storage_fault(e: BaseException | None) -> str | None:
  """The one-line account of a write that failed for lack of space (or a limit, or a read-only file
  system), from an exception or any exception it was raised from; None when it is something else.
  Orbax's (TensorStore's) errors carry the errno as text: os_error_code='28'."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    code, path = None, None
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
      code, path = e.errno, e.filename
    else:
      m = re.search(r"os_error_code='(\d+)'", str(e))
      if m and int(m.group(1)) in _STORAGE_ERRNOS:
        code = int(m.group(1))
        where = re.search(r'Failed writing: "([^"]+)"', str(e)) or re.search(r'file "([^"]+)"', str(e))
        path = where.group(1) if where else None
    if code is not None:
      return (f'cannot write {path or "to the workdir"}: {os.strerror(code)} (errno {code}); free space (or raise '
              'the limit) and run the same command again: what was saved before is intact')
    e = e.__cause__ or e.__context__
  return None


def check_store(workdir: str) -> None:
  """A workdir in a bucket that cannot be used (no credentials, no network): a ConfigError now, before
  any work, rather than a traceback from the first write minutes later."""
  why = files.probe(workdir, timeout=float(os.environ.get('SRDD_STORE_PROBE_SECONDS', 15)))
  if why:
    raise ConfigError(f'--workdir={workdir}: {why}')


def file_identity(path: str) -> dict:
  """A file's path, size and modification time: enough to tell it was written again."""
  st = files.size_and_mtime(path)
  if st is None:
    return {'path': files.absolute(path)}
  return {'path': files.absolute(path), 'bytes': st[0], 'mtime_ns': st[1]}


def check_space(directory: str, need: int, what: str) -> None:
  """A ConfigError when the file system of `directory` has less free space than `need` bytes (and a
  margin) for `what`."""
  free = files.free_bytes(directory)
  if free is None:
    return  # Nothing to measure (a bucket, a mount without statvfs): the write will tell.
  if free < need * 1.05 + (16 << 20):
    raise ConfigError(f'{directory}: {free / 2**20:.0f} MiB free, {what} needs about {need / 2**20:.0f} MiB; '
                      'free space and run the same command again: what was saved before is intact')


class Outputs:
  """A run's outputs: the directory `final`, replaced whole or not at all.

  `claim()` (before the long work) refuses when `final` holds an earlier run's outputs, unless
  `overwrite`; `begin()` gives a temporary sibling (`final`.partial) to write everything into; `commit()`
  swaps it into place. The old outputs are removed only after the new ones are complete: a run cut
  short (SIGTERM, SIGKILL, a full disk) leaves the old outputs, or none, never a mix; its partial folder
  is removed by the next run (which holds the workdir lock, so no other run is writing it), and a swap
  cut between its two renames is undone there (`final`.replaced goes back into place).
  """

  def __init__(self, final: str, what: str, overwrite: bool = False):
    self.final, self.what, self.overwrite = final, what, overwrite
    self.partial, self.replaced = final + '.partial', final + '.replaced'

  def _recover(self) -> None:
    if files.is_remote(self.final):
      self._recover_in_bucket()
      return
    if files.isdir(self.replaced):
      if files.exists(self.final):
        files.rmtree(self.replaced)
      else:
        files.rename(self.replaced, self.final)
        logging.warning('%s: an earlier run was stopped while replacing these %s; the old ones are back',
                        self.final, self.what)
    if files.exists(self.partial):
      logging.warning('removing %s, left by a run stopped before its %s were complete', self.partial, self.what)
      files.rmtree(self.partial)

  def _recover_in_bucket(self) -> None:
    # A committed partial folder is complete: a swap cut short is finished, never undone.
    if files.committed(self.partial):
      logging.warning('%s: an earlier run was stopped while putting its %s in place; finishing that', self.final,
                      self.what)
      self._swap_in_bucket()
    elif files.holds_files(self.partial):
      logging.warning('removing %s, left by a run stopped before its %s were complete', self.partial, self.what)
      files.rmtree(self.partial)

  def _swap_in_bucket(self) -> None:
    """The committed partial folder copied over `final` (whose marker goes first and comes back last),
    then removed: a reader that trusts only a committed `final` never sees a mix."""
    files.remove(files.join(self.final, files.COMMIT_MARKER))
    files.rmtree(self.final)
    files.copytree(self.partial, self.final, last=files.COMMIT_MARKER)
    files.rmtree(self.partial)

  def claim(self) -> None:
    self._recover()
    if files.isfile(self.final):
      raise ConfigError(f'{self.final} is a file where this run writes its {self.what} (a folder); move it away')
    if files.holds_files(self.final):
      shown = files.listdir(self.final)
      shown = ', '.join(shown[:3]) + (' ...' if len(shown) > 3 else '')
      if not self.overwrite:
        raise ConfigError(f'{self.final} already holds {self.what} of an earlier run ({shown}); they are never '
                          'replaced silently: choose another --workdir, or pass --overwrite to replace them')
      logging.warning('--overwrite: %s (%s) will be replaced once the new %s are complete', self.final, shown,
                      self.what)

  def begin(self) -> str:
    """The folder to write the outputs into (empty)."""
    self._recover()
    files.makedirs(self.partial)
    return self.partial

  def commit(self) -> str:
    """The outputs written to `begin()`'s folder take the place of `final`'s; returns `final`."""
    if files.is_remote(self.final):
      files.commit(self.partial)
      self._swap_in_bucket()
    elif files.exists(self.final):
      files.rename(self.final, self.replaced)
      files.rename(self.partial, self.final)
      files.rmtree(self.replaced)
    else:
      files.makedirs(files.dirname(self.final) or '.')
      files.rename(self.partial, self.final)
    return self.final

  def pending(self) -> bool:
    """Whether `final` is being replaced (a bucket's swap cut short): not to be trusted until the next
    `claim()` or `begin()` finishes it."""
    return files.is_remote(self.final) and files.committed(self.partial)


def write_json(path: str, obj) -> None:
  """`obj` as JSON at `path`, atomically: a reader (or a run cut short) sees the old file or the new
  one, never half of one."""
  files.write_json(path, obj)


def _flat(d, prefix='') -> dict:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f'{prefix}.{k}' if prefix else str(k)))
  return out


def describe_change(old: dict | None, new: dict) -> str:
  """'key: old -> new' for the entries of two (nested) input records that differ, the first few."""
  if old is None:
    return 'no record of what they were made from'
  a, b = _flat(old), _flat(new)
  changed = [f'{k}: {a.get(k, "(none)")!r} -> {b.get(k, "(none)")!r}' for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k)]
  return '; '.join(changed[:3]) + (f'; and {len(changed) - 3} more' if len(changed) > 3 else '')


def _as_recorded(inputs: dict | None) -> dict | None:
  """`inputs` as it reads back from the JSON record (tuples as lists, other values as text)."""
  return None if inputs is None else json.loads(json.dumps(inputs, default=str))


# Keys this version added to the identities units record (convert/params_io.model_identity): a record without
# them, equal to the current one on every key it has, was made from the same inputs by an earlier version.
ADDED_IDENTITY_KEYS = ('model_json_sha256', 'params_files')


def recorded_by_an_earlier_version(old: dict | None, new: dict) -> bool:
  """Whether record `old` is `new` less some ADDED_IDENTITY_KEYS (nothing else differing)."""
  if old is None:
    return False
  a, b = _flat(old), _flat(new)
  added = set(b) - set(a)
  return bool(added) and all(a[k] == b.get(k) for k in a) and all(
      k.rsplit('.', 1)[-1] in ADDED_IDENTITY_KEYS for k in added)


def _made_from_other_inputs(where: str, change: str) -> ConfigError:
  return ConfigError(f'{where} was made from other inputs than this run gives ({change}); it is kept, not '
                     'replaced: run with the inputs it was made from, or use another --workdir')


class Units:
  """Units of work run once in a workdir, so that a command run again after an interruption resumes
  where it stopped, redoing only the unit that was cut short.

  `units(name, fn)`: a unit done when ROOT/<name>/<result> exists; then fn is skipped and that file's
  JSON is the unit's value. Otherwise fn() runs and its dict, with the unit's wall time
  (`unit_seconds`), is written there last (atomically, by process 0 only). fn returning None (a
  training stage stopped before its end) records nothing: the unit runs again next time.
  `units(name, fn, output=PATH)`: a unit whose result is a file or directory fn writes itself (a token
  cache's manifest, a samples file): done when PATH exists; a unit kept so returns None.
  `units.timed(name, fn)`: a unit that resumes by itself (training from its checkpoints) runs every
  time; it is timed and logged like the others.

  With `inputs` (a JSON-able dict: what the unit is made from) and an `inputs_file`, the unit's inputs
  are recorded there (ROOT/<inputs_file>): a unit done from other inputs is done again (`redo`; fn
  must replace its outputs whole) or refused with a ConfigError naming the change (not `redo`: its
  outputs are work to keep, e.g. a token cache that checkpoints were trained on); a timed unit whose
  recorded inputs differ is refused before it runs. A done unit without a record (an earlier version's
  workdir) is done again when `redo`, else its inputs are recorded as they are now.
  """

  def __init__(self, root: str, result: str = 'result.json', label: str = 'unit', inputs_file: str | None = None):
    self.root, self.result, self.label = root, result, label
    self.inputs_file = files.join(root, inputs_file) if inputs_file else None
    self.ran, self.kept = [], []
    self.seconds = {}  # Unit -> its wall time when it ran (JSON units kept: as recorded then).
    # Called as on_done(name, value, seconds, ran) after each JSON unit, run now (ran) or kept: progress.
    self.on_done = None

  def path(self, name: str) -> str:
    return files.join(self.root, name, self.result)

  def _records(self) -> dict:
    if not self.inputs_file or not files.isfile(self.inputs_file):
      return {}
    try:
      return files.read_json(self.inputs_file)
    except ValueError:
      logging.warning('%s is unreadable: every unit is checked as if it had no record', self.inputs_file)
      return {}

  def _record(self, name: str, inputs: dict | None) -> None:
    if self.inputs_file and multihost.is_main_process():
      records = self._records()
      if inputs is None:
        records.pop(name, None)
      else:
        records[name] = inputs
      write_json(self.inputs_file, records)

  def _changed(self, name: str, inputs: dict, where: str, redo: bool) -> bool:
    """Whether done unit `name` (its outputs at `where`) must be done again for `inputs`."""
    old = self._records().get(name)
    if old == inputs:
      return False
    if recorded_by_an_earlier_version(old, inputs):
      self._record(name, inputs)
      return False
    change = describe_change(old, inputs)
    if redo:
      logging.warning('%s %s: %s were made from other inputs (%s); done again', self.label, name, where, change)
      return True
    if old is None:
      logging.warning('%s %s: %s has no record of its inputs (an earlier version made it); recorded as now',
                      self.label, name, where)
      self._record(name, inputs)
      return False
    raise _made_from_other_inputs(where, change)

  def __call__(self, name: str, fn, output: str | None = None, inputs: dict | None = None, redo: bool = True):
    inputs = _as_recorded(inputs)
    if output is not None and files.exists(output) and not Outputs(files.dirname(output), '').pending():
      if inputs is None or not self._changed(name, inputs, output, redo):
        logging.info('%s %s: %s exists, kept', self.label, name, output)
        self.kept.append(name)
        return None
    path = self.path(name)
    if output is None and files.isfile(path):
      if inputs is None or not self._changed(name, inputs, path, redo):
        out = files.read_json(path)
        logging.info('%s %s: done, kept', self.label, name)
        self.kept.append(name)
        self.seconds[name] = out.get('unit_seconds', 0.0)
        if self.on_done:
          self.on_done(name, out, self.seconds[name], False)
        return out
    if inputs is not None:
      self._record(name, None)  # Until fn completes, no outputs are vouched for.
    out, seconds = self._run(name, fn)
    if output is None and out is not None:
      out = {**out, 'unit_seconds': seconds}
      if multihost.is_main_process():
        write_json(path, out)
    if out is not None and inputs is not None:
      self._record(name, inputs)
    if out is not None and output is None and self.on_done:
      self.on_done(name, out, seconds, True)
    return out

  def timed(self, name: str, fn, inputs: dict | None = None, where: str = ''):
    """`inputs`: what the unit's saved state (`where`, e.g. its checkpoints) is made from; refused if
    the record says otherwise, recorded before it runs."""
    if inputs is not None:
      self.saved_state(name, inputs, where or name)
    return self._run(name, fn)[0]

  def saved_state(self, name: str, inputs: dict, where: str, saved: bool = True) -> None:
    """Before state that resumes by itself (`where`, e.g. checkpoints) is used: refused with a
    ConfigError naming the change when the record says it was made from other `inputs`; `inputs`
    recorded otherwise. `saved` False (no state there yet) records `inputs` whatever the record says."""
    inputs = _as_recorded(inputs)
    old = self._records().get(name)
    if saved and old is not None and old != inputs and not recorded_by_an_earlier_version(old, inputs):
      raise _made_from_other_inputs(where, describe_change(old, inputs))
    if saved and old is None:
      logging.warning('%s %s: %s has no record of its inputs (an earlier version made it); recorded as now',
                      self.label, name, where)
    if old != inputs:
      self._record(name, inputs)

  def _run(self, name: str, fn):
    t0 = time.time()
    logging.info('%s %s', self.label, name)
    out = fn()
    seconds = round(time.time() - t0, 2)
    if out is None:  # Stopped before its end: nothing is recorded.
      return None, seconds
    self.ran.append(name)
    self.seconds[name] = seconds
    logging.info('%s %s done in %.0fs', self.label, name, seconds)
    return out, seconds


# Settings a training run resumed from its checkpoints may change: how it is logged, saved, evaluated,
# laid out or computed, not what it learns; and its length (a finished run continued to more steps, as
# the driver offers; the schedule follows the new length from the step it resumes at).
RESUMABLE_CHANGES = {
    'model': ('checkpoint', 'cpu_matmul', 'attention', 'remat'),
    'train': ('log_every', 'checkpoint_every', 'keep_checkpoints', 'sample_every', 'heldout_cache',
              'heldout_every', 'heldout_examples', 'accum_steps', 'steps', 'epochs'),
    'data': ('token_cache', 'workers'),
    'tokenizer': ('checkpoint', 'reference_npz', 'params_sha256', 'allow_random', 'precision'),
    'tokenizer_train': ('log_every', 'checkpoint_every', 'keep_checkpoints', 'eval_every', 'eval_examples',
                        'eval_path', 'eval_split', 'grid_examples', 'prefetch'),
    'distill': ('token_cache',),
}
TRAINING_INPUTS_FILE = 'training_inputs.json'  # Beside a training run's checkpoints/: what they are made from.


def training_inputs(config, sections, **identities) -> dict:
  """What a training run's checkpoints are made from, for Units.saved_state: the seed, the config's
  `sections` less RESUMABLE_CHANGES, and the `identities` of the files it reads (tokenizer, token cache,
  start model, teacher)."""
  out = {'seed': int(config.seed)}
  for name in sections:
    if name in config:
      keep = RESUMABLE_CHANGES.get(name, ())
      out[f'config.{name}'] = {k: v for k, v in config[name].to_dict().items() if k not in keep}
  out.update(identities)
  return out
