"""Every command in the README is accepted as written on the shipped configs.

`python -m srdd_jax.main ...` and `python -m srdd_jax.scaling ...` commands run with `--dry_run` (flags
parsed, the config file loaded, every override applied to an existing key, the defaults filled in; the
scaling plan built; nothing runs), `launch/launch.py` with `--dry-run` (a `--plan` given a small plan of
the same format); the tools answer `--help`. The embedded default's commands also run for real in
`make demo`.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands() -> list[str]:
  """The shell commands of the README's bash blocks, continuation lines joined, comments dropped."""
  text = open(os.path.join(REPO, 'README.md')).read()
  commands = []
  for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
    joined = block.replace('\\\n', ' ')
    for line in joined.splitlines():
      line = line.split('  #')[0].strip()
      if line and not line.startswith('#'):
        commands.append(line)
  return commands


def _plan(path: str) -> str:
  """A plan.json of the format launch/launch.py reads, two points."""
  cmd = lambda name: ['python', '-m', 'srdd_jax.main', '--config=configs/smoke.py', f'--workdir=/tmp/x/{name}',
                      '--mode=train']
  with open(path, 'w') as f:
    json.dump({'format': 'srdd_jax.scaling/1', 'prepare_command': ['python', '-m', 'srdd_jax.scaling', 'prepare'],
               'points': [{'name': n, 'command': cmd(n)} for n in ('a', 'b')]}, f)
  return path


def _check(command: str, tmp: str):
  argv = shlex.split(command.replace('[--strict]', '--strict'))
  if argv[:3] == ['python', '-m', 'srdd_jax.main'] or argv[:3] == ['python', '-m', 'srdd_jax.scaling']:
    argv = [sys.executable, '-m', argv[2]] + [
        f'--workdir={tmp}' if a.startswith('--workdir') else a for a in argv[3:]] + ['--dry_run']
  elif argv[:1] == ['launch/launch.py']:
    plan = _plan(f'{tmp}_plan_{abs(hash(command))}.json')
    argv = [sys.executable, 'launch/launch.py'] + [f'--plan={plan}' if a.startswith('--plan=') else a
                                                    for a in argv[1:] if a != '--dry-run']
    argv = argv[:3] + ['--dry-run'] + argv[3:] if '--' in argv else argv + ['--dry-run']
  elif argv[:2] == ['python', '-m'] and argv[2].startswith('srdd_jax.tools.'):
    argv = [sys.executable, '-m', argv[2], '--help']
  elif argv[:1] == ['make']:
    return None  # The two make targets are what CI and the demo run.
  else:
    raise AssertionError(f'a README command of an unknown kind: {command}')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_every_readme_command_is_accepted(tmp_path):
  commands = readme_commands()
  mains = [c for c in commands if 'srdd_jax.main' in c]
  assert len(mains) >= 8 and any('--mode=eval' in c for c in mains)
  for part in ('srdd_jax.scaling plan', 'srdd_jax.scaling run', 'srdd_jax.scaling fit', 'launch/launch.py tpu',
               'launch/launch.py slurm', 'launch/launch.py local', '--mode=ablation', '--mode=distill',
               '--mode=edit', 'convert_var'):
    assert any(part in c for c in commands), part
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(lambda c: _check(c, str(tmp_path / 'wd')), commands))
  failed = [f'{c}\n  rc {r.returncode}: {r.stderr[-600:]}' for c, r in zip(commands, results)
            if r is not None and r.returncode != 0]
  assert not failed, '\n'.join(failed)
  assert not os.path.exists(tmp_path / 'wd')  # A dry run writes nothing.


def test_a_dry_run_still_refuses_a_bad_key(tmp_path):
  r = subprocess.run([sys.executable, '-m', 'srdd_jax.main', '--config=configs/smoke.py', f'--workdir={tmp_path}',
                      '--config.train.stepz=1', '--dry_run'], cwd=REPO, capture_output=True, text=True,
                     timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert r.returncode == 2 and "config.train has no key 'stepz'" in r.stderr
