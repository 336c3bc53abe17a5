"""Every command in the README is accepted as written on the shipped configs.

`python -m srdd_jax.main ...` and `python -m srdd_jax.scaling ...` commands run with `--dry_run` (flags
parsed, the config file loaded, every override applied to an existing key, the defaults filled in; the
scaling plan built; nothing runs), `launch/launch.py` with `--dry-run` (a `--plan` given a small plan of
the same format); the tools answer `--help`. srdd_jax.main's commands and the tools' --help run in this
process, one srdd_jax.main command also as a process. The embedded default's commands also run for real in
`make demo`.
"""
from __future__ import annotations

import concurrent.futures
import importlib
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from srdd_jax import main

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


def _check(command: str, tmp: str, capsys=None):
  """Checks one README command: (exit status, stderr), or None for a make target. With `capsys`, a
  `python -m srdd_jax.main` command runs in this process (srdd_jax.main.run, the command's own parse and
  dry run) and a tool's `--help` calls its main; other commands, and every command without `capsys`,
  run as processes."""
  argv = shlex.split(command.replace('[--strict]', '--strict'))
  if argv[:3] == ['python', '-m', 'srdd_jax.main'] or argv[:3] == ['python', '-m', 'srdd_jax.scaling']:
    argv = [sys.executable, '-m', argv[2]] + [
        f'--workdir={tmp}' if a.startswith('--workdir') else a for a in argv[3:]] + ['--dry_run']
    if capsys is not None and argv[2] == 'srdd_jax.main':
      rc = main.run(argv[2:])
      return rc, capsys.readouterr().err
  elif argv[:1] == ['launch/launch.py']:
    plan = _plan(f'{tmp}_plan_{abs(hash(command))}.json')
    argv = [sys.executable, 'launch/launch.py'] + [f'--plan={plan}' if a.startswith('--plan=') else a
                                                    for a in argv[1:] if a != '--dry-run']
    argv = argv[:3] + ['--dry-run'] + argv[3:] if '--' in argv else argv + ['--dry-run']
  elif argv[:2] == ['python', '-m'] and argv[2].startswith('srdd_jax.tools.'):
    argv = [sys.executable, '-m', argv[2], '--help']
    if capsys is not None:
      with pytest.raises(SystemExit) as e:  # argparse's --help exits 0 after printing the usage.
        importlib.import_module(argv[2]).main(argv[3:])
      out = capsys.readouterr()
      return (e.value.code or 0) if 'usage:' in out.out else f'no usage printed: {out.out[:200]!r}', out.err
  elif argv[:2] == ['python', '-m'] and argv[2].startswith('benchmarks.'):
    argv = [sys.executable, '-m', argv[2], '--help']
  elif argv[:1] == ['launch/gpu_study.sh']:
    argv = ['bash'] + [f'{tmp}_gpu' if a == 'DIR' else a for a in argv]
    env = dict(os.environ, JAX_PLATFORMS='cpu', GPU_STUDY_DRY_RUN='1', PYTHON=sys.executable)
    r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr
  elif argv[:1] == ['make']:
    return None  # The two make targets are what CI and the demo run.
  else:
    raise AssertionError(f'a README command of an unknown kind: {command}')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  return r.returncode, r.stderr


def _this_host(rc, err: str) -> bool:
  """Whether a dry run refused a README command only for what this machine lacks, which the one validation
  checks since issue 47: a file or folder the command names that is not here (the reader's checkpoints and
  data sets, e.g. ckpt/var_d16 or /data/ffhq), or a batch that does not split over the tests' 8 forced CPU
  devices (the README's commands are written for one device or the reader's accelerators). Any other
  refusal (a key, a value) is a failure."""
  errors = [line for line in err.splitlines() if line.startswith('error: ')]
  if rc != 2 or len(errors) != 1:
    return False
  if 'must be a positive multiple of the data-parallel size 8' in errors[0]:
    return True
  missing = re.search(r"does not exist|no such file|no such image file|holds no", errors[0])
  paths = re.findall(r"'([^']+)'", errors[0])
  return bool(missing) and any(not os.path.exists(os.path.join(REPO, p)) for p in paths)


def test_every_readme_command_is_accepted(tmp_path, capsys):
  """The srdd_jax.main commands and the tools' --help in this process, the first srdd_jax.main command
  also as a process (`python -m srdd_jax.main`, absl's parse of the real command line), and the
  scaling and launch commands as processes, two at a time beside the in-process checks."""
  commands = readme_commands()
  mains = [c for c in commands if 'srdd_jax.main' in c]
  assert len(mains) >= 8 and any('--mode=eval' in c for c in mains)
  for part in ('srdd_jax.scaling plan', 'srdd_jax.scaling run', 'srdd_jax.scaling fit', 'launch/launch.py tpu',
               'launch/launch.py slurm', 'launch/launch.py local', '--mode=ablation', '--mode=distill',
               '--mode=edit', 'convert_var'):
    assert any(part in c for c in commands), part
  in_process = [c for c in commands if c.startswith('python -m srdd_jax.main') or
                c.startswith('python -m srdd_jax.tools.')]
  processes = [mains[0]] + [c for c in commands if c not in in_process]
  assert len(in_process) >= len(mains) + 4
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = [pool.submit(_check, c, str(tmp_path / 'wd')) for c in processes]
    results = [(c, _check(c, str(tmp_path / 'wd'), capsys)) for c in in_process]
    results += [(c, f.result()) for c, f in zip(processes, futures)]
  assert len(results) == len(commands) + 1
  failed = [f'{c}\n  rc {r[0]}: {r[1][-600:]}' for c, r in results
            if r is not None and r[0] != 0 and not _this_host(*r)]
  assert not failed, '\n'.join(failed)
  assert not os.path.exists(tmp_path / 'wd')  # A dry run writes nothing.


def test_a_dry_run_still_refuses_a_bad_key(tmp_path, capsys):
  """In this process (srdd_jax.main.run); tests/test_reliability runs such a refusal as a real process."""
  rc = main.run(['srdd_jax.main', '--config=configs/smoke.py', f'--workdir={tmp_path}', '--config.train.stepz=1',
                 '--dry_run'])
  assert rc == 2 and "config.train has no key 'stepz'" in capsys.readouterr().err
