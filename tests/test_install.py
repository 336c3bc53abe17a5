"""What the README's two make targets install: `make demo` what running needs (no test extra, so no
libtpu and none of its TPU-initialisation warnings on a CPU), `make test` the test extra besides."""
import importlib.metadata as md
import re
import shutil
import subprocess

import pytest
from packaging.requirements import Requirement

ROOT = __file__.rsplit('/tests/', 1)[0]


def _make_n(target: str, tmp_path) -> list[str]:
  if shutil.which('make') is None:
    pytest.skip('make is not installed')
  out = subprocess.run(['make', '-n', target, f'VENV={tmp_path}/venv', f'FASHION_MNIST={tmp_path}'], cwd=ROOT,
                       capture_output=True, text=True, check=True).stdout
  return [line for line in out.splitlines() if ' pip install ' in line and 'upgrade pip' not in line]


def test_make_demo_installs_no_extra_and_make_test_the_test_extra(tmp_path):
  demo, test = _make_n('demo', tmp_path), _make_n('test', tmp_path)
  assert demo and all(re.search(r'-e \.$', line) for line in demo), demo
  assert any("-e '.[test]'" in line for line in test), test


def _closure(dist: str, extras=frozenset()) -> set[str]:
  """The installed distributions `dist` (with `extras`) requires, recursively, by this environment's
  metadata and markers."""
  seen, todo = set(), [(dist, frozenset(extras))]
  while todo:
    name, ex = todo.pop()
    key = re.sub(r'[-_.]+', '-', name).lower()
    if (key, ex) in seen:
      continue
    seen.add((key, ex))
    try:
      reqs = md.requires(name) or []
    except md.PackageNotFoundError:
      continue
    for r in map(Requirement, reqs):
      if r.marker is None or any(r.marker.evaluate({'extra': e}) for e in (ex or {''})):
        todo.append((r.name, frozenset(r.extras)))
  return {k for k, _ in seen}


def test_the_plain_install_pulls_no_libtpu():
  try:
    md.distribution('srdd_jax')
  except md.PackageNotFoundError:
    pytest.skip('srdd_jax is not installed (pip install -e .)')
  plain, tested = _closure('srdd_jax'), _closure('srdd_jax', {'test'})
  assert 'jax' in plain and not any(n.startswith('libtpu') for n in plain), sorted(plain)
  assert 'pytest' in tested and 'pytest' not in plain
  if any(d.metadata['Name'].lower().startswith('libtpu') for d in md.distributions()):
    assert any(n.startswith('libtpu') for n in tested)  # The test extra brings it (where it installs).
