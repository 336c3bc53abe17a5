"""The layers read one way. Every module's imports are parsed (ast) and checked against the order

  {config, files} -> parallel -> data -> transformer -> tokenizer -> convert -> {diffusion, train, evaluation}
  -> study -> modes -> {main, bench} -> scaling   (tools/: command-line programs, imported by nothing in the library)

A module imports only from its own package and from layers below it (the three packages of one layer
do not import each other); imports sit at the top of a module, except those of heavy optional libraries
that only some paths need; trainers and the driver's tasks live in train/ (the runners in modes/ read
the config, build the pieces and call them); and no file of the package, the tests, the benchmarks or
the configs uses another module's private name (a module's own test, tests/test_<name>.py, may).
"""
from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, 'srdd_jax')

LAYERS = {
    'config': 0, 'files': 0, 'parallel': 1, 'data': 2, 'transformer': 3, 'tokenizer': 4, 'convert': 5,
    'diffusion': 6, 'train': 6, 'evaluation': 6, 'study': 6.5, 'modes': 7, 'main': 8, 'bench': 8, 'scaling': 9,
    'tools': 9,
}
# Deferred because importing them costs seconds or they are needed by one path only: TensorFlow and
# TFDS, torch (reading .pth files), PIL and matplotlib (images), scikit-learn (the digits data set),
# clu (its metric writers import TensorFlow); Pallas' TPU kernels (splash attention, TPU runs only).
HEAVY_OPTIONAL = ('tensorflow', 'tensorflow_datasets', 'torch', 'PIL', 'matplotlib', 'sklearn', 'clu',
                  'jax.experimental.pallas')
# Deferred in one module only, each for its reason: the GPU machines the benchmark suite runs on have no
# ml_collections, and config builds a ConfigDict in two functions only; the bench's var_pytorch runs the
# user's VAR checkout (its `models` package and the hub mixin VAR's code imports) in a process of its
# own; files asks google.auth for credentials only when a workdir is a gs:// path; events (TensorBoard's
# protos) is imported by every trainer and used only by runs whose workdir is in a bucket.
DEFERRED = {'srdd_jax.config': ('ml_collections',),
            'srdd_jax.bench.var_pytorch': ('models', 'huggingface_hub'), 'srdd_jax.files': ('google.auth',),
            'srdd_jax.train.events': ('tensorboard',)}


def _unit(module: str) -> str:
  """'srdd_jax.train.driver' -> 'train'; 'srdd_jax.config' -> 'config'; 'srdd_jax' -> ''."""
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else ''


def _imports(tree: ast.AST, module: str):
  """(imported module, names, line, at module level) for every import in `tree`."""
  package = module.rsplit('.', 1)[0]
  nested = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      nested.update(id(n) for n in ast.walk(node) if n is not node)
  for node in ast.walk(tree):
    level = id(node) not in nested
    if isinstance(node, ast.Import):
      for a in node.names:
        yield a.name, (), node.lineno, level
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1] + ([base] if base else []))
      yield base, tuple(a.name for a in node.names), node.lineno, level


def violations(source: str, module: str) -> list[str]:
  """Every break of the rules in one module's source; `module` is its dotted name."""
  tree = ast.parse(source)
  own = _unit(module)
  out = []
  aliases = {}  # Local name -> srdd_jax module it is bound to.
  for target, names, line, top_level in _imports(tree, module):
    where = f'{module}:{line}'
    root = target.split('.')[0]
    allowed = HEAVY_OPTIONAL + DEFERRED.get(module, ())
    if not top_level and not any(target == h or target.startswith(h + '.') for h in allowed):
      out.append(f'{where}: function-level import of {target}')
    if root != 'srdd_jax' or target == '__future__':
      continue
    imported = [target] if not names else [f'{target}.{n}' for n in names]
    for full in imported:
      unit = _unit(full)
      if unit not in LAYERS:  # A name from srdd_jax/__init__.py, or a module outside the layers.
        continue
      if unit != own and own in LAYERS and LAYERS[unit] >= LAYERS[own]:
        out.append(f'{where}: {own} (layer {LAYERS[own]}) imports {full} (layer {LAYERS[unit]})')
  for node in ast.walk(tree):
    if not isinstance(node, ast.ClassDef) or own == 'train':
      continue
    for base in node.bases:
      name = base.attr if isinstance(base, ast.Attribute) else getattr(base, 'id', '')
      if name.endswith(('Task', 'Trainer')):
        out.append(f'{module}:{node.lineno}: the class {node.name} extends {name} outside train/')
  return out


def _modules(tops=('srdd_jax',)):
  for top in tops:
    for root, dirs, files in os.walk(os.path.join(REPO, top)):
      dirs[:] = sorted(d for d in dirs if d != '__pycache__' and not d.startswith('.'))
      for f in sorted(files):
        if f.endswith('.py'):
          path = os.path.join(root, f)
          rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
          yield rel, path


# The trees whose private names no other module may use, and that may not use others'.
PROJECT = ('srdd_jax', 'tests', 'benchmarks', 'configs')


def _private(name: str) -> bool:
  return name.startswith('_') and not name.startswith('__')


def _own_test(module: str, owner: str) -> bool:
  """tests/test_<name>.py is the own test of every module named <name>."""
  return module.startswith('tests.test_') and owner.rsplit('.', 1)[-1] == module[len('tests.test_'):]


def private_uses(source: str, module: str) -> list[str]:
  """Every use, in one file (`module` its dotted name), of a private name of another project module:
  imported (`from m import _x`), read through a module or a name imported from one (`m._x`,
  `m.Class._x`), or named in getattr/setattr/monkeypatch (`setattr(m, '_x', v)`, 'srdd_jax.m._x')."""
  tree = ast.parse(source)
  out = []
  aliases = {}  # Local name -> the dotted project name it is bound to.

  def foreign(owner: str) -> bool:
    return (owner.split('.')[0] in PROJECT and owner != module and not owner.startswith(module + '.')
            and not _own_test(module, owner))

  def report(line: int, owner: str, name: str, how: str):
    if foreign(owner):
      out.append(f'{module}:{line}: {how} the private name {name} of {owner}')

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.asname:
          aliases[a.asname] = a.name
        else:
          root = a.name.split('.')[0]
          aliases[root] = root
  for target, names, line, _ in _imports(tree, module):
    for n in names:
      if _private(n):
        report(line, target, n, 'imports')
      aliases[n] = f'{target}.{n}'

  def dotted(node):
    """'a.b.c' of an expression a.b.c built from one bound name, or None."""
    if isinstance(node, ast.Name):
      return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
      base = dotted(node.value)
      return base and f'{base}.{node.attr}'
    return None

  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and _private(node.attr):
      owner = dotted(node.value)
      if owner:
        report(node.lineno, owner, node.attr, 'uses')
    elif isinstance(node, ast.Call) and len(node.args) >= 2:
      func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, 'id', '')
      if func not in ('getattr', 'setattr', 'hasattr', 'delattr'):
        continue
      first, second = node.args[0], node.args[1]
      if isinstance(second, ast.Constant) and isinstance(second.value, str) and _private(second.value):
        owner = dotted(first)
        if owner:
          report(node.lineno, owner, second.value, 'uses')
      if isinstance(first, ast.Constant) and isinstance(first.value, str) and '.' in first.value:
        owner, _, name = first.value.rpartition('.')  # monkeypatch.setattr('pkg.module._name', value)
        if _private(name):
          report(node.lineno, owner, name, 'uses')
  return out


def test_no_private_name_is_used_across_modules():
  found = []
  count = 0
  for module, path in _modules(PROJECT):
    with open(path) as f:
      found += private_uses(f.read(), module)
    count += 1
  assert count > 100  # The walk found the four trees.
  assert not found, '\n'.join(found)


@pytest.mark.parametrize('module, source, expected', [
    ('tests.test_sampler', 'from srdd_jax.modes.train import _x\n', 'imports the private name _x of srdd_jax.modes.train'),
    ('srdd_jax.modes.tokenize', 'from srdd_jax.modes.train import _tokenizer\n', 'private name _tokenizer'),
    ('tests.test_check_reference', 'from tests.test_resample import _area_loop\n', 'private name _area_loop'),
    ('benchmarks.aot_sweep', 'import srdd_jax.bench as b\nb._ints("--mesh", "1")\n',
     'uses the private name _ints of srdd_jax.bench'),
    ('tests.test_ablation', 'from srdd_jax import main\nmain._MODES\n', 'private name _MODES of srdd_jax.main'),
    ('tests.test_ablation', 'import srdd_jax.main\nsrdd_jax.main._MODES\n', 'private name _MODES of srdd_jax.main'),
    ('tests.test_refine', 'from srdd_jax.train.step import Trainer\nTrainer._step\n',
     'private name _step of srdd_jax.train.step.Trainer'),
    ('srdd_jax.data.token_cache', 'from srdd_jax.data import source\nx = source._AUG_TAG\n',
     'uses the private name _AUG_TAG'),
    ('srdd_jax.data.token_cache', 'from . import source\nx = source._AUG_TAG\n', 'uses the private name _AUG_TAG'),
    ('tests.test_sampler', 'def f(monkeypatch):\n  monkeypatch.setattr(bench, "_x", 1)\nfrom srdd_jax import bench\n',
     'uses the private name _x of srdd_jax.bench'),
    ('tests.test_data', 'def f(monkeypatch):\n  monkeypatch.setattr("srdd_jax.bench._x", 1)\n',
     'uses the private name _x of srdd_jax.bench'),
    # A module's own test may; others' privates (numpy's, say) are not the project's; nor is self._x.
    ('tests.test_scaling', 'from srdd_jax import scaling\nscaling._var_config(1)\n', None),
    ('tests.test_distill', 'from srdd_jax.train.distill import _heldout_sums\n', None),
    ('tests.test_data', 'import numpy as np\nnp._NoValue\nclass A:\n  def f(self):\n    return self._x\n', None),
    ('srdd_jax.bench', 'from srdd_jax.config import ints\n', None),
])
def test_the_private_name_checker_finds_each_kind_of_use(module, source, expected):
  found = private_uses(source, module)
  if expected is None:
    assert not found, found
  else:
    assert any(expected in v for v in found), found


def test_every_module_follows_the_layers():
  found = []
  count = 0
  for module, path in _modules():
    with open(path) as f:
      found += violations(f.read(), module)
    count += 1
  assert count > 50  # The walk found the package.
  assert not found, '\n'.join(found)


def package_imports(sources: dict[str, str]) -> dict[str, set[str]]:
  """module -> the modules of `sources` ({dotted name: source}) it imports, at the top or in a function
  (an import deferred to a call is still a dependence)."""
  graph = {}
  for module, source in sources.items():
    found = set()
    for target, names, _, _ in _imports(ast.parse(source), module):
      subs = [f'{target}.{n}' for n in names if f'{target}.{n}' in sources]
      if len(subs) < len(names) or not names:  # `import m`, or names defined in m itself.
        subs.append(target)
      found.update(m for m in subs if m in sources and m != module)
    graph[module] = found
  return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A circle of imports in `graph` as [a, b, ..., a], or None when every import goes one way."""
  done, path = set(), []

  def visit(m):
    path.append(m)
    for n in sorted(graph.get(m, ())):
      if n in path:
        return path[path.index(n):] + [n]
      if n not in done:
        circle = visit(n)
        if circle:
          return circle
    path.pop()
    done.add(m)
    return None

  for m in sorted(graph):
    if m not in done:
      circle = visit(m)
      if circle:
        return circle
  return None


def test_the_bench_package_imports_one_way():
  sources = {}
  for module, path in _modules((os.path.join('srdd_jax', 'bench'),)):
    with open(path) as f:
      sources[module] = f.read()
  graph = package_imports(sources)
  # The walk found the package, and the command line is built on its parts.
  assert graph['srdd_jax.bench.cli'] >= {f'srdd_jax.bench.{m}' for m in
                                         ('base', 'timing', 'aot', 'flags', 'vs_var', 'suite')}, graph
  assert import_cycle(graph) is None, ' -> '.join(import_cycle(graph))
  # The PyTorch side is run by a PyTorch environment's Python, which may have neither jax nor the package.
  module = 'srdd_jax.bench.var_pytorch'
  roots = {target.split('.')[0] for target, _, _, _ in _imports(ast.parse(sources[module]), module)}
  assert not roots & {'srdd_jax', 'jax', 'jaxlib', 'flax'}, roots


@pytest.mark.parametrize('sources, circle', [
    # The layout before the package: bench's command line imported the suite in a function, the suite
    # imported bench.
    ({'srdd_jax.bench': 'def main():\n  from srdd_jax import bench_suite\n',
      'srdd_jax.bench_suite': 'from srdd_jax import bench\nfrom srdd_jax.bench import fail\n'},
     ['srdd_jax.bench', 'srdd_jax.bench_suite', 'srdd_jax.bench']),
    ({'p.a': 'from p.b import x\n', 'p.b': 'import p.c\n', 'p.c': 'from p import a\n'},
     ['p.a', 'p.b', 'p.c', 'p.a']),
    ({'p.a': 'from p import b, c\n', 'p.b': 'from p.c import x\n', 'p.c': 'import os\n'}, None),
])
def test_the_cycle_checker_finds_a_circle_of_imports(sources, circle):
  assert import_cycle(package_imports(sources)) == circle


# Modules that compose whole runs from the runners, stage after stage: main's table of modes, --mode=all
# (the stages of one model), --mode=study (hands the stages to srdd_jax/study for every arm) and
# scaling studies (the shared stages, then the training of every point), and --dry_run's table of the
# modes' checks.
COMPOSERS = ('srdd_jax.main', 'srdd_jax.modes.all', 'srdd_jax.modes.study', 'srdd_jax.modes.scaling',
             'srdd_jax.scaling', 'srdd_jax.modes.checks')


def test_only_main_imports_runners_and_nothing_imports_tools():
  for module, path in _modules():
    with open(path) as f:
      tree = ast.parse(f.read())
    for target, names, line, _ in _imports(tree, module):
      full = [target] + [f'{target}.{n}' for n in names]
      if any(_unit(t) == 'tools' for t in full) and _unit(module) != 'tools':
        pytest.fail(f'{module}:{line} imports the command-line tool {target}')
      runners = [t for t in full if _unit(t) == 'modes' and t.split('.')[-1] != 'modes']
      if runners and module not in COMPOSERS:
        pytest.fail(f'{module}:{line} imports the runner {runners[0]}')


@pytest.mark.parametrize('module, source, expected', [
    ('srdd_jax.train.driver', 'from srdd_jax.modes import train\n', 'train (layer 6) imports srdd_jax.modes.train'),
    ('srdd_jax.data.pipeline', 'from srdd_jax.tokenizer import api\n', 'data (layer 2) imports'),
    ('srdd_jax.diffusion.generate', 'from srdd_jax.evaluation import metrics\n', 'diffusion (layer 6) imports'),
    ('srdd_jax.modes.distill', 'from srdd_jax.train import driver\nclass T(driver.Task):\n  pass\n',
     'the class T extends Task outside train/'),
    ('srdd_jax.modes.train', 'from srdd_jax.train.step import Trainer\nclass T(Trainer):\n  pass\n',
     'extends Trainer outside train/'),
    ('srdd_jax.train.transformer_task', 'from srdd_jax.train import driver\nclass T(driver.Task):\n  pass\n', None),
    ('srdd_jax.modes.all', 'def f():\n  from srdd_jax.modes import sample\n', 'function-level import'),
    ('srdd_jax.modes.all', 'import os\nos.environ\n', None),
    ('srdd_jax.data.folder', 'def f():\n  from PIL import Image\n', None),
    ('srdd_jax.train.step', 'from srdd_jax.convert import params_io\nfrom . import optimizer\n', None),
])
def test_the_checker_finds_each_kind_of_violation(module, source, expected):
  found = violations(source, module)
  if expected is None:
    assert not found
  else:
    assert any(expected in v for v in found), found
