"""JAX's persistent compilation cache, on for every mode, and a count of what each run compiled.

A d16-d30 train step takes 44-92 s to compile on a TPU, and the sampler, held-out and per-stage
programs more; without the cache every restart (a preemption, a time limit) and every host pays that
again. Where the cache lives, first match wins:
  config.compile_cache   a directory (local or gs://), or 'off';
  JAX_COMPILATION_CACHE_DIR (or jax_compilation_cache_dir set by the caller: tests/conftest.py does);
  WORKDIR/jax_cache      the run's own, so a resumed run finds it (a bucket workdir: a bucket cache).
JAX writes entries from process 0 only (jax/_src/compiler.py `_cache_write`), so the hosts of a pod
share one cache without write contention; gs:// paths go through etils.epath, as every file here does.
"""
from __future__ import annotations

import dataclasses
import os

import jax
from absl import logging
from jax.experimental.compilation_cache import compilation_cache as _jax_cache

from srdd_jax import files

SUBDIR = 'jax_cache'
OFF = 'off'
_MIN_TIME_ENV = 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'

# The events JAX 0.10 records (jax/_src/compiler.py, dispatch.py, pxla.py).
_REQUESTS = '/jax/compilation_cache/compile_requests_use_cache'
_HITS = '/jax/compilation_cache/cache_hits'
_WRITES = '/jax/compilation_cache/cache_misses'  # Recorded when an entry is written, not on every miss.
_BACKEND_COMPILE = '/jax/core/compile/backend_compile_duration'  # Compiling or loading from the cache.


@dataclasses.dataclass
class Counts:
  programs: int = 0  # XLA compiles asked for (each loaded from the cache or compiled).
  requests: int = 0  # Those that looked in the persistent cache.
  hits: int = 0
  writes: int = 0
  seconds: float = 0.0  # In XLA's compile-or-load, hits included.

  @property
  def misses(self) -> int:
    return self.requests - self.hits


_counts = Counts()
_listening = False
_ours: str | None = None  # The directory this module chose, so a later run in this process may choose again.
_turned_off = False  # By an earlier run of this process ('off'), not by the user.


def _on_event(event: str, **_):
  if event == _REQUESTS:
    _counts.requests += 1
  elif event == _HITS:
    _counts.hits += 1
  elif event == _WRITES:
    _counts.writes += 1


def _on_duration(event: str, seconds: float, **_):
  if event == _BACKEND_COMPILE:
    _counts.programs += 1
    _counts.seconds += seconds


def setup(workdir: str, configured: str = '') -> str | None:
  """Turns the cache on (see the module's doc for where) and starts this run's counts; returns the
  directory, or None when `configured` is 'off'."""
  global _listening, _ours, _counts, _turned_off
  _counts = Counts()
  if not _listening:
    jax.monitoring.register_event_listener(_on_event)
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    _listening = True
  configured = (configured or '').strip()
  if configured.lower() == OFF:
    jax.config.update('jax_enable_compilation_cache', False)
    _ours, _turned_off = None, True
    return None
  if _turned_off:
    jax.config.update('jax_enable_compilation_cache', True)
    _turned_off = False
  current = jax.config.jax_compilation_cache_dir
  if not configured and current and current != _ours:
    return current  # The caller's: its thresholds are the caller's too.
  path = configured or files.join(workdir, SUBDIR)
  if path != current:
    jax.config.update('jax_compilation_cache_dir', path)
    # JAX settles whether the cache is used at its first compile; one may have happened already.
    _jax_cache.reset_cache()
  if _MIN_TIME_ENV not in os.environ:
    # JAX's default keeps only programs that took 1 s or more; a restart should compile nothing, and the
    # small programs are many (one per sampling scale, metric and shape).
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  _ours = path
  return path


def ensure(workdir: str) -> str | None:
  """setup(workdir) unless a run of this process has set the cache up already (srdd_jax.main does, for
  every mode; a runner called directly has not): the directory in use, or None when off."""
  return directory() if _listening else setup(workdir)


def directory() -> str | None:
  """The cache directory in use, or None (not set, or off)."""
  return jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None


def counts() -> Counts:
  return dataclasses.replace(_counts)


def line() -> str:
  """This run's compiles in one line (logged at the end of every mode)."""
  c, where = _counts, directory()
  cache = (f'{c.hits} loaded from the persistent cache ({where}), {c.misses} compiled and looked up in it '
           f'({c.writes} written)') if where else 'persistent cache off'
  return f'compilation: {c.programs} programs, {c.seconds:.1f} s compiling or loading; {cache}'


def log():
  if _listening:  # Nothing to tell before a run set the cache up (a dry run).
    logging.info('%s', line())
