"""The layers read one way. Every module's imports are parsed (ast) and checked against the order

  config -> parallel -> data -> transformer -> tokenizer -> convert -> {diffusion, train, evaluation}
  -> modes -> {main, bench} -> scaling   (tools/: command-line programs, imported by nothing in the library)

A module imports only from its own package and from layers below it (the three packages of one layer
do not import each other); no module imports another module's private name; and imports sit at the
top of a module, except those of heavy optional libraries that only some paths need.
"""
from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, 'srdd_jax')

LAYERS = {
    'config': 0, 'parallel': 1, 'data': 2, 'transformer': 3, 'tokenizer': 4, 'convert': 5,
    'diffusion': 6, 'train': 6, 'evaluation': 6, 'modes': 7, 'main': 8, 'bench': 8, 'scaling': 9, 'tools': 9,
}
# Deferred because importing them costs seconds or they are needed by one path only: TensorFlow and
# TFDS, torch (reading .pth files), PIL and matplotlib (images), scikit-learn (the digits data set),
# clu (its metric writers import TensorFlow); Pallas' TPU kernels (splash attention, TPU runs only).
HEAVY_OPTIONAL = ('tensorflow', 'tensorflow_datasets', 'torch', 'PIL', 'matplotlib', 'sklearn', 'clu',
                  'jax.experimental.pallas')


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
    if not top_level and not any(target == h or target.startswith(h + '.') for h in HEAVY_OPTIONAL):
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
    for n in names:
      if n.startswith('_'):
        out.append(f'{where}: imports the private name {n} of {target}')
      aliases[n] = f'{target}.{n}'
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and node.attr.startswith('_') and not node.attr.startswith('__')
        and isinstance(node.value, ast.Name) and node.value.id in aliases):
      out.append(f'{module}:{node.lineno}: uses the private name {node.attr} of {aliases[node.value.id]}')
  return out


def _modules():
  for root, _, files in os.walk(PACKAGE):
    for f in sorted(files):
      if f.endswith('.py'):
        path = os.path.join(root, f)
        rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
        yield rel, path


def test_every_module_follows_the_layers():
  found = []
  count = 0
  for module, path in _modules():
    with open(path) as f:
      found += violations(f.read(), module)
    count += 1
  assert count > 50  # The walk found the package.
  assert not found, '\n'.join(found)


# Runners that extend another runner's task: --mode=distill is --mode=train's TransformerTask with the
# teacher's architecture, the student's scales and another initialisation (a subclass, not a copy).
# TODO: move TransformerTask below modes/ (train/) once the trainers that edit it concurrently have landed.
_RUNNERS_EXTENDED = {'srdd_jax.modes.distill': ('srdd_jax.modes.train', 'srdd_jax.modes.train.TransformerTask')}


# Modules that compose whole runs from the runners, stage after stage: main's table of modes, --mode=all
# (the stages of one model), --mode=ablation (those stages for every variant, and --mode=distill) and
# scaling studies (the shared stages, then the training of every point).
COMPOSERS = ('srdd_jax.main', 'srdd_jax.modes.all', 'srdd_jax.modes.ablation', 'srdd_jax.modes.scaling',
             'srdd_jax.scaling')


def test_only_main_imports_runners_and_nothing_imports_tools():
  for module, path in _modules():
    with open(path) as f:
      tree = ast.parse(f.read())
    for target, names, line, _ in _imports(tree, module):
      full = [target] + [f'{target}.{n}' for n in names]
      if any(_unit(t) == 'tools' for t in full) and _unit(module) != 'tools':
        pytest.fail(f'{module}:{line} imports the command-line tool {target}')
      runners = [t for t in full if _unit(t) == 'modes' and t.split('.')[-1] != 'modes'
                 and t not in _RUNNERS_EXTENDED.get(module, ())]
      if runners and module not in COMPOSERS:
        pytest.fail(f'{module}:{line} imports the runner {runners[0]}')


@pytest.mark.parametrize('module, source, expected', [
    ('srdd_jax.train.driver', 'from srdd_jax.modes import train\n', 'train (layer 6) imports srdd_jax.modes.train'),
    ('srdd_jax.data.pipeline', 'from srdd_jax.tokenizer import api\n', 'data (layer 2) imports'),
    ('srdd_jax.diffusion.generate', 'from srdd_jax.evaluation import metrics\n', 'diffusion (layer 6) imports'),
    ('srdd_jax.modes.tokenize', 'from srdd_jax.modes.train import _tokenizer\n', 'private name _tokenizer'),
    ('srdd_jax.data.token_cache', 'from srdd_jax.data import source\nx = source._AUG_TAG\n',
     'uses the private name _AUG_TAG'),
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
