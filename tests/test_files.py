"""Every file the package reads or writes goes through srdd_jax/files.py (etils.epath), so that a workdir,
a data set or a model may be a bucket path (gs://...) as well as a local one. Every module is parsed
(ast) and its calls checked: no builtin open, os.path, os's file functions, shutil, pathlib, glob,
numpy's file readers and writers, or PIL opening a path, outside files.py. The package's own files
(paths built from __file__: its code, not a user's path) are exempt, and so is each entry of ALLOWED,
each for its reason.
"""
from __future__ import annotations

import ast
import os

import pytest

from srdd_jax import files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, 'srdd_jax')

ALLOWED = {
    # The one path module.
    'srdd_jax/files.py': None,
    # A script run by a PyTorch environment's Python (python srdd_jax/bench/var_pytorch.py), which imports
    # nothing of the package (nor etils): it reads the local VAR checkout it times and its job file.
    'srdd_jax/bench/var_pytorch.py': None,
    # flock needs a descriptor of the local workdir directory itself (a bucket's lock is a lease object).
    'srdd_jax/parallel/workdir.py': {'os.open'},
}

_OS_FILE_FUNCTIONS = {'open', 'fdopen', 'replace', 'rename', 'renames', 'remove', 'unlink', 'rmdir', 'removedirs',
                      'makedirs', 'mkdir', 'listdir', 'scandir', 'walk', 'stat', 'lstat', 'statvfs', 'chmod',
                      'link', 'symlink', 'truncate'}
_NUMPY_FILE_FUNCTIONS = {'load', 'save', 'savez', 'savez_compressed', 'loadtxt', 'savetxt', 'fromfile', 'genfromtxt',
                         'memmap'}
_MODULES = {'shutil', 'pathlib', 'glob', 'tempfile'}
# tempfile's private local scratch (a child process's job file) is no user path; its folders are.
_TEMPFILE_OK = {'tempfile.mkstemp', 'tempfile.gettempdir'}


def _dotted(node) -> str | None:
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    base = _dotted(node.value)
    return base and f'{base}.{node.attr}'
  return None


def _mentions_own_code(node) -> bool:
  return any(isinstance(n, ast.Name) and n.id == '__file__' for n in ast.walk(node))


def file_accesses(source: str) -> list[tuple[int, str]]:
  """(line, what) of each file access in `source` that does not go through srdd_jax.files."""
  tree = ast.parse(source)
  found = []
  # 'np' -> 'numpy', 'Image' -> 'PIL.Image', 'pth' -> 'os.path': what each name is bound to.
  aliases = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        aliases[a.asname or a.name.split('.')[0]] = a.name if a.asname else a.name.split('.')[0]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for a in node.names:
        aliases[a.asname or a.name] = f'{node.module}.{a.name}'
        if node.module.split('.')[0] in _MODULES or node.module == 'os.path':
          found.append((node.lineno, f'from {node.module} import {a.name}'))

  def resolve(name: str | None) -> str | None:
    if not name:
      return None
    head, _, rest = name.partition('.')
    full = aliases.get(head, head)
    return f'{full}.{rest}' if rest else full

  own = {id(n) for n in _inside_own_code(tree)}
  for node in ast.walk(tree):
    if id(node) in own:
      continue
    if isinstance(node, ast.Attribute) and (resolve(_dotted(node)) or '').startswith('os.path.'):
      found.append((node.lineno, resolve(_dotted(node))))
      continue
    if not isinstance(node, ast.Call):
      continue
    if isinstance(node.func, ast.Attribute) and node.func.attr == 'save' and isinstance(node.func.value, ast.Call) \
        and resolve(_dotted(node.func.value.func)) == 'PIL.Image.fromarray':
      found.append((node.lineno, 'PIL.Image.fromarray(...).save'))
      continue
    name = resolve(_dotted(node.func))
    if name is None:
      continue
    parts = name.split('.')
    if name == 'open' and 'open' not in aliases:
      found.append((node.lineno, 'open'))
    elif parts[0] == 'os' and len(parts) == 2 and parts[1] in _OS_FILE_FUNCTIONS:
      found.append((node.lineno, name))
    elif (parts[0] in _MODULES and name not in _TEMPFILE_OK) or name in ('gzip.open', 'zipfile.ZipFile'):
      found.append((node.lineno, name))
    elif parts[0] == 'numpy' and parts[-1] in _NUMPY_FILE_FUNCTIONS:
      found.append((node.lineno, name))
    elif name == 'PIL.Image.open' and not (node.args and 'BytesIO' in (resolve(_dotted(getattr(node.args[0], 'func', None)))
                                                                       or '')):
      found.append((node.lineno, name))
  return sorted(set(found))


def _inside_own_code(tree):
  """Every node of a statement that builds a path from __file__ (the package's own code)."""
  for node in ast.walk(tree):
    if isinstance(node, (ast.Call, ast.Assign)) and _mentions_own_code(node):
      yield from ast.walk(node)


def test_no_file_is_read_or_written_outside_the_path_module():
  found, count = [], 0
  for root, _, names in os.walk(PACKAGE):
    for name in sorted(names):
      if not name.endswith('.py'):
        continue
      path = os.path.join(root, name)
      rel = os.path.relpath(path, REPO)
      allowed = ALLOWED.get(rel, set())
      count += 1
      if allowed is None:
        continue
      with open(path) as f:
        source = f.read()
      found += [f'{rel}:{line}: {what}' for line, what in file_accesses(source) if what not in allowed]
  assert count > 100  # The walk found the package.
  assert not found, ('these go around srdd_jax/files.py (a bucket path would fail there):\n' + '\n'.join(found))


@pytest.mark.parametrize('source, expected', [
    ('import os\nos.path.exists(p)\n', 'os.path.exists'),
    ('import os.path as osp\nosp.join(a, b)\n', 'os.path.join'),
    ('from os import path\npath.isdir(d)\n', 'os.path.isdir'),
    ('with open(p) as f:\n  f.read()\n', 'open'),
    ('import os\nos.replace(a, b)\n', 'os.replace'),
    ('import os\nos.makedirs(d, exist_ok=True)\n', 'os.makedirs'),
    ('import shutil\nshutil.rmtree(d)\n', 'shutil.rmtree'),
    ('import numpy as np\nnp.load(p)\n', 'numpy.load'),
    ('import numpy as np\nnp.savez(p, a=a)\n', 'numpy.savez'),
    ('from PIL import Image\nImage.open(p)\n', 'PIL.Image.open'),
    ('from PIL import Image\nImage.fromarray(a).save(p)\n', 'PIL.Image.fromarray(...).save'),
    ('import pathlib\npathlib.Path(p).read_text()\n', 'pathlib.Path'),
    ('import gzip\ngzip.open(p)\n', 'gzip.open'),
    ('import tempfile\ntempfile.mkdtemp(dir=workdir)\n', 'tempfile.mkdtemp'),
    # Not file accesses of a user path: bytes in memory, the package's own code, the files module.
    ('import io\nfrom PIL import Image\nImage.open(io.BytesIO(b))\n', None),
    ('import os\nREPO = os.path.dirname(os.path.abspath(__file__))\n', None),
    ('from srdd_jax import files\nwith files.open(p) as f:\n  pass\nfiles.np_load(p)\n', None),
    ('import os\nos.environ.get("X")\nos.getpid()\n', None),
])
def test_the_file_access_checker_finds_each_kind(source, expected):
  found = [what for _, what in file_accesses(source)]
  if expected is None:
    assert not found, found
  else:
    assert expected in found, found


def test_bucket_paths_keep_their_scheme():
  assert files.join('gs://b/run', 'checkpoints', '5') == 'gs://b/run/checkpoints/5'
  assert files.dirname('gs://b/run/x.json') == 'gs://b/run'
  assert files.basename('gs://b/run/') == 'run'
  assert files.absolute('gs://b/run') == 'gs://b/run'
  assert files.relpath('gs://b/run/eval/a.npz', 'gs://b/run/eval') == 'a.npz'
  assert files.is_within('gs://b/run/eval/a.npz', 'gs://b/run/eval')
  assert not files.is_within('gs://b/run/evaluation', 'gs://b/run/eval')
  assert files.is_remote('gs://b/x') and not files.is_remote('/tmp/x') and not files.is_remote('file:///tmp/x')


def test_local_files_are_written_whole(tmp_path):
  p = str(tmp_path / 'a' / 'b.json')
  files.write_json(p, {'x': 1})
  assert files.read_json(p) == {'x': 1} and files.listdir(tmp_path / 'a') == ['b.json']  # No temporary left.
  files.append_text(str(tmp_path / 'm.jsonl'), 'a\n')
  files.append_text(str(tmp_path / 'm.jsonl'), 'b\n')
  assert files.read_text(str(tmp_path / 'm.jsonl')) == 'a\nb\n'
  assert files.create_exclusive(str(tmp_path / 'lock'), b'1')
  assert not files.create_exclusive(str(tmp_path / 'lock'), b'2')
  assert files.read_text(str(tmp_path / 'lock')) == '1'
