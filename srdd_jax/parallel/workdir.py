"""Safety of a workdir: one run at a time, outputs never replaced by accident, units of work run once.

One run per workdir: WORKDIR/.srdd.lock names the run that holds it.

Two runs writing one workdir interleave metrics.jsonl and race inside Orbax saves. The lock is a file
created atomically (O_EXCL) by process 0 of a run and removed when the run ends, however it ends. A
lock whose process no longer exists on this host is stale: it is taken over with a warning. A lock
held on another host cannot be checked from here; the message says how to remove it.
"""
from __future__ import annotations

import datetime
import glob
import json
import os
import shutil
import socket
import sys
import time

from absl import logging

from srdd_jax.config import ConfigError
from srdd_jax.parallel import multihost

LOCK_NAME = '.srdd.lock'


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
    self.path = os.path.join(workdir, LOCK_NAME)
    self.enabled = enabled
    self.held = False

  def _holder(self) -> dict:
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def acquire(self) -> None:
    if not self.enabled:
      return
    me = {'pid': os.getpid(), 'host': socket.gethostname(),
          'started': datetime.datetime.now().isoformat(timespec='seconds'), 'command': ' '.join(sys.argv)}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        h = self._holder()
        if h.get('host') == me['host'] and isinstance(h.get('pid'), int) and not _alive(h['pid']):
          logging.warning('%s was left by process %d, which no longer runs; taking it over', self.path, h['pid'])
          os.remove(self.path)
          continue
        raise ConfigError(
            f'workdir {os.path.dirname(self.path)!r} is in use by process {h.get("pid", "?")} on host '
            f'{h.get("host", "?")} since {h.get("started", "?")} ({h.get("command", "?")}); wait for it to '
            f'finish or use another --workdir (if that run is gone, delete {self.path})') from None
      except OSError as e:
        raise ConfigError(f'cannot write to --workdir={os.path.dirname(self.path)!r}: {e.strerror}') from e
      with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
      self.held = True
      return

  def release(self) -> None:
    if self.held:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
      self.held = False

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
    return False


def claim_outputs(out_dir: str, patterns, overwrite: bool, what: str) -> None:
  """Refuses to write into `out_dir` when an earlier run left outputs matching `patterns` there, unless
  `overwrite`; then removes them first, so old and new outputs never mix."""
  existing = sorted(p for pattern in patterns for p in glob.glob(os.path.join(out_dir, pattern)))
  if not existing:
    return
  shown = ', '.join(os.path.relpath(p, out_dir) for p in existing[:3]) + (' ...' if len(existing) > 3 else '')
  if not overwrite:
    raise ConfigError(f'{out_dir} already holds {what} of an earlier run ({shown}); they are never replaced '
                      'silently: choose another --workdir, or pass --overwrite to replace them')
  logging.warning('--overwrite: removing %d earlier outputs in %s (%s)', len(existing), out_dir, shown)
  for p in existing:
    if os.path.isdir(p):
      shutil.rmtree(p)
    else:
      os.remove(p)


def write_json(path: str, obj) -> None:
  """`obj` as JSON at `path`, atomically: written to a temporary file that is then renamed, so a reader
  (or a run cut short) sees the old file or the new one, never half of one."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f, indent=1, default=float)
  os.replace(path + '.tmp', path)


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
  """

  def __init__(self, root: str, result: str = 'result.json', label: str = 'unit'):
    self.root, self.result, self.label = root, result, label
    self.ran, self.kept = [], []
    self.seconds = {}  # Unit -> its wall time when it ran (JSON units kept: as recorded then).

  def path(self, name: str) -> str:
    return os.path.join(self.root, name, self.result)

  def __call__(self, name: str, fn, output: str | None = None):
    if output is not None and os.path.exists(output):
      logging.info('%s %s: %s exists, kept', self.label, name, output)
      self.kept.append(name)
      return None
    path = self.path(name)
    if output is None and os.path.isfile(path):
      with open(path) as f:
        out = json.load(f)
      logging.info('%s %s: done, kept', self.label, name)
      self.kept.append(name)
      self.seconds[name] = out.get('unit_seconds', 0.0)
      return out
    out, seconds = self._run(name, fn)
    if output is None and out is not None:
      out = {**out, 'unit_seconds': seconds}
      if multihost.is_main_process():
        write_json(path, out)
    return out

  def timed(self, name: str, fn):
    return self._run(name, fn)[0]

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
