"""The persistent compilation cache every mode turns on: where it goes, and a restart that compiles nothing."""
import os
import re
import subprocess
import sys

import jax

from srdd_jax.parallel import compile_cache
from tests.conftest import REPO, xla_flags

_LINE = re.compile(r'compilation: (\d+) programs, ([\d.]+) s compiling or loading; (\d+) loaded from the '
                   r'persistent cache \((.*)\), (\d+) compiled and looked up in it \((\d+) written\)')


def _smoke(workdir, *overrides, env):
  r = subprocess.run([sys.executable, '-m', 'srdd_jax.main', '--config=configs/smoke.py', f'--workdir={workdir}',
                      '--mode=train', '--config.train.steps=2', '--config.train.checkpoint_every=2',
                      '--config.train.global_batch=4', *overrides],
                     capture_output=True, text=True, env=env, cwd=REPO, check=False, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  m = _LINE.search(r.stderr)
  assert m, r.stderr[-3000:]
  programs, seconds, hits, where, misses, written = m.groups()
  return {'programs': int(programs), 'seconds': float(seconds), 'hits': int(hits), 'dir': where,
          'misses': int(misses), 'written': int(written)}


def test_second_start_compiles_nothing(tmp_path):
  """The default cache (WORKDIR/jax_cache, no JAX_COMPILATION_CACHE_DIR), then a second start on a fresh
  workdir given that cache by config.compile_cache: every program of the second comes from the cache."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_COMPILATION_CACHE', 'JAX_PERSISTENT'))}
  env['XLA_FLAGS'] = xla_flags()  # One CPU device: fewer programs to compile, the same code paths.
  first = _smoke(tmp_path / 'a', env=env)
  cache = str(tmp_path / 'a' / 'jax_cache')
  assert first['dir'] == cache and first['hits'] == 0 and first['written'] == first['misses'] > 0
  second = _smoke(tmp_path / 'b', f'--config.compile_cache={cache}', env=env)
  assert second['dir'] == cache and second['misses'] == 0 and second['written'] == 0
  assert second['hits'] == first['misses'] and second['programs'] == first['programs']
  assert second['seconds'] < first['seconds']
  assert not os.path.exists(tmp_path / 'b' / 'jax_cache')


def test_where_the_cache_goes(tmp_path):
  """The caller's directory (conftest's, as a user's JAX_COMPILATION_CACHE_DIR) is kept, a configured one
  replaces it, 'off' turns the cache off; the choice of one run does not stick to the next in a process."""
  before = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  try:
    assert before[0] and compile_cache.setup(str(tmp_path)) == before[0]
    assert compile_cache.setup(str(tmp_path), str(tmp_path / 'c')) == str(tmp_path / 'c')
    assert compile_cache.setup(str(tmp_path), 'off') is None and compile_cache.directory() is None
    assert 'persistent cache off' in compile_cache.line()
    assert compile_cache.setup(str(tmp_path), str(tmp_path / 'c')) == compile_cache.directory()
  finally:
    jax.config.update('jax_compilation_cache_dir', before[0])
    jax.config.update('jax_enable_compilation_cache', before[1])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', before[2])
    compile_cache._jax_cache.reset_cache()  # pylint: disable=protected-access
