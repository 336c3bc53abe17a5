#!/usr/bin/env python3
"""Start `python -m srdd_jax.main` on a Cloud TPU pod slice, a SLURM GPU cluster or this machine.

  launch/launch.py tpu   --name=NAME --zone=ZONE [--accelerator=v5p-64 --queued] [--sync] -- MAIN_ARGS
  launch/launch.py slurm --nodes=4 --gpus_per_node=8 [--partition=P] -- MAIN_ARGS
  launch/launch.py local [--processes=2 --devices=2] -- MAIN_ARGS
  launch/launch.py BACKEND ... --plan=ROOT/plan.json        # every point of `python -m srdd_jax.scaling plan`

MAIN_ARGS are srdd_jax.main's (--config=... --workdir=... --mode=...). --dry-run prints the exact
commands (one per line, shell-quoted) and runs nothing; without it they run in order and the first
failure stops the launch with its exit status. With --plan the shared stages of the study run first
(`python -m srdd_jax.scaling prepare`, the tokenizer and token caches every point reads), then every
point's training command from the plan, each as its own multi-host job.

tpu    An existing slice (--name), or a new one as a queued resource (--queued with --accelerator and
       --runtime; --spot for spot capacity), waited for until ACTIVE. --sync copies the repository's
       committed files (git archive of HEAD) to every worker, with any uncommitted input inside the
       repository that the config names, and makes the virtual environment there (launch/tpu_host.sh
       setup: a Python >= 3.11, provisioned where the image has 3.10, and jax[tpu]). The paths the
       command names (--config, the config's checkpoints, data, caches) are committed, copied, or checked
       on every worker before anything starts. Then on every host (`gcloud compute tpus tpu-vm ssh NAME
       --worker=all`): the previous run is stopped (SIGTERM, its checkpoint saved) with whatever else holds
       the TPU, and the command (a plan's jobs chained) starts with --multihost, detached from SSH (its own
       session), LIBTPU_INIT_ARGS set (--libtpu_init_args), each host's output in WORKDIR/logs/host_N.log.
       The work directory must be shared by the hosts (a GCS bucket or NFS).
slurm  One batch script per job (written next to the plan or into --script_dir), submitted with sbatch:
       one task per node, the coordinator is the job's first node (scontrol show hostnames), each task's
       process id its SLURM_PROCID; `srun` starts them. Jobs of a plan are chained (afterok) so the
       prepare job finishes before the points start.
local  This machine: one process (--processes=1), or N processes with D forced CPU devices each meeting
       through a localhost coordinator (a multi-host run without a cluster).

Needs no JAX: it builds and runs commands only.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = 8476  # The coordinator's port on the first host (jax.distributed's default is 1234 on TPU).
HOST_SCRIPT = 'launch/tpu_host.sh'  # What each TPU host runs: setup, check, stop, start (detached).
# XLA's asynchronous collectives and their fusion, so FSDP's all-gathers and reduce-scatters overlap the
# layers' compute: the flags maxtext's v5p recipes export (AI-Hypercomputer/maxtext,
# MaxText/configs/v5p/32b.sh, 64b.sh and 128b.sh export this same set, read 2026-12-07), each present in
# libtpu 0.0.42 (jax 0.10.2's).
LIBTPU_INIT_ARGS = ' '.join([
    '--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true',
    '--xla_tpu_megacore_fusion_allow_ags=false',
    '--xla_enable_async_collective_permute=true',
    '--xla_tpu_enable_ag_backward_pipelining=true',
    '--xla_tpu_enable_data_parallel_all_reduce_opt=true',
    '--xla_tpu_data_parallel_opt_different_sized_ops=true',
    '--xla_tpu_enable_async_collective_fusion=true',
    '--xla_tpu_enable_async_collective_fusion_multiple_steps=true',
    '--xla_tpu_overlap_compute_collective_tc=true',
    '--xla_enable_async_all_gather=true',
])
# Config keys naming an input the run reads. data.* only for a source that reads files.
INPUT_KEYS = (('tokenizer', 'checkpoint'), ('tokenizer', 'reference_npz'), ('tokenizer_train', 'eval_path'),
              ('data', 'path'), ('data', 'token_cache'), ('model', 'checkpoint'), ('train', 'init_from'),
              ('distill', 'teacher'), ('distill', 'token_cache'), ('edit', 'image'), ('edit', 'mask'),
              ('eval', 'inception_weights'), ('eval', 'reference'), ('eval', 'samples'))


class LaunchError(Exception):
  pass


# --- what to run -------------------------------------------------------------------------------------

def jobs_from_plan(path: str, python: str) -> list[tuple[str, list[str]]]:
  """(name, srdd_jax argv without the interpreter) of the plan's prepare stage and of every point."""
  try:
    with open(path) as f:
      plan = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise LaunchError(f'--plan={path!r}: cannot read it ({e})') from e
  if not str(plan.get('format', '')).startswith('srdd_jax.scaling/'):
    raise LaunchError(f'--plan={path!r} is not a plan of `python -m srdd_jax.scaling plan` '
                      f'(format {plan.get("format")!r})')
  strip = lambda argv: argv[1:] if argv and argv[0] != '-m' else argv  # The plan's own interpreter goes.
  jobs = [('prepare', strip(plan['prepare_command']))] if plan.get('prepare_command') else []
  jobs += [(p['name'], strip(p['command'])) for p in plan['points']]
  return jobs


def main_jobs(main_args: list[str]) -> list[tuple[str, list[str]]]:
  if not main_args:
    raise LaunchError('nothing to launch: give srdd_jax.main arguments after -- or --plan=FILE')
  return [('main', ['-m', 'srdd_jax.main', *main_args])]


def with_multihost(argv: list[str]) -> list[str]:
  """The srdd_jax argv with --multihost after the module (the cluster is detected by JAX)."""
  return argv if '--multihost' in argv else argv[:2] + ['--multihost'] + argv[2:]


def _flag(args: list[str], name: str) -> str | None:
  return next((x.split('=', 1)[1] for x in args if x.startswith(f'{name}=')), None)


def named_paths(main_args: list[str]) -> list[tuple[str, str]]:
  """(what names it, path) of every input a srdd_jax.main command line names: the --config file and the
  config's input paths, its --config.* overrides applied. Reads the config file (ml_collections), not JAX."""
  spec = _flag(main_args, '--config')
  if not spec:
    return []
  out = [('--config', spec.partition(':')[0])]
  if not os.path.isfile(os.path.join(REPO, out[0][1])) and not os.path.isfile(out[0][1]):
    raise LaunchError(f'--config={spec}: no config file {out[0][1]!r}')
  sys.path.insert(0, REPO)
  try:
    from srdd_jax.config import load_file, with_defaults  # pylint: disable=import-outside-toplevel
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
      config = with_defaults(load_file(spec)).to_dict()
    finally:
      os.chdir(cwd)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else ''
    raise LaunchError(f'--config={spec}: cannot read it to check the paths it names ({type(e).__name__}: '
                      f'{first})' + ('; run the launcher with the repository\'s Python (.venv/bin/python '
                                    'launch/launch.py)' if isinstance(e, ImportError) else '')) from e
  finally:
    sys.path.remove(REPO)
  workdir = _flag(main_args, '--workdir') or ''
  if workdir.startswith('gs://'):  # The run makes its workdir, in a bucket that must exist.
    out.append(('--workdir', 'gs://' + workdir[5:].split('/', 1)[0]))
  mode = _flag(main_args, '--mode') or 'reconstruct'
  for section, key in INPUT_KEYS:
    value = _flag(main_args, f'--config.{section}.{key}')
    if value is None:
      value = config.get(section, {}).get(key)
    source = _flag(main_args, '--config.data.source') or config.get('data', {}).get('source')
    if section == 'data' and key == 'path' and (source == 'synthetic' or mode in ('sample', 'edit')):
      continue
    if value and isinstance(value, str):
      out.append((f'config.{section}.{key}', value))
  return out


def _in_head(path: str) -> bool:
  r = subprocess.run(['git', '-C', REPO, 'ls-tree', '-r', '--name-only', 'HEAD', '--', path.rstrip('/')],
                     capture_output=True, text=True, check=False)
  return r.returncode == 0 and bool(r.stdout.strip())


def sort_paths(paths: list[tuple[str, str]], sync: bool) -> tuple[list[str], list[str]]:
  """(paths to check on every host, relative paths to copy beside the archive). With --sync a relative
  path is in the archive (committed), or is copied from here, or is an error naming it."""
  remote, extra = [], []
  for what, path in paths:
    if path.startswith('gs://') or os.path.isabs(path) or not sync:
      remote.append(path)
    elif _in_head(path):
      continue
    elif what == '--config':
      raise LaunchError(f'--config={path}: not committed, and --sync copies the committed files (git archive '
                        'HEAD): commit it')
    elif os.path.exists(os.path.join(REPO, path)):
      extra.append(path)
    else:
      raise LaunchError(f'{what}={path!r} is relative to the repository, not committed and not here, so no '
                        f'worker would have it: give a gs:// path or one that exists on every worker '
                        f'(--{what}=...)' if what.startswith('config.') else f'{what}={path!r} does not exist')
  return remote, extra


def log_dir(jobs) -> str:
  """Where each host's log goes: the workdir of the job (the study's root for a plan: the prepare
  stage's, else the first point's parent)."""
  for _, argv in jobs:
    w = _flag(argv, '--workdir')
    if w:
      return w.rstrip('/') + '/logs' if len(jobs) == 1 or argv[1] == 'srdd_jax.scaling' else (
          os.path.dirname(w.rstrip('/')) + '/logs')
  return 'srdd_logs'


# --- backends ----------------------------------------------------------------------------------------

def tpu_commands(a, jobs) -> list[list[str]]:
  base = ['gcloud', 'compute', 'tpus']
  where = [f'--zone={a.zone}'] + ([f'--project={a.project}'] if a.project else [])
  out = []
  if a.queued:
    if not (a.accelerator and a.runtime):
      raise LaunchError('--queued needs --accelerator (e.g. v5p-64) and --runtime (e.g. v2-alpha-tpuv5)')
    out.append(base + ['queued-resources', 'create', f'{a.name}-qr', f'--node-id={a.name}',
                       f'--accelerator-type={a.accelerator}', f'--runtime-version={a.runtime}', *where]
               + (['--spot'] if a.spot else []))
    # Polls until the slice exists (ACTIVE); a FAILED or SUSPENDED request ends the launch.
    describe = shlex.join(base + ['queued-resources', 'describe', f'{a.name}-qr', *where,
                                  '--format=value(state.state)'])
    out.append(['bash', '-c', f'while true; do s=$({describe}); echo "queued resource {a.name}-qr: $s"; '
                'case "$s" in ACTIVE) exit 0;; FAILED|SUSPENDED) exit 1;; esac; sleep 30; done'])
  ssh = base + ['tpu-vm', 'ssh', a.name, *where, '--worker=all']
  host = lambda sub, env='': ssh + [f'--command=cd {a.repo_dir} && {env}bash {HOST_SCRIPT} {sub}']
  # A plan's stages create the inputs of its points, so only a single command's paths are checked.
  paths = named_paths(jobs[0][1][2:]) if len(jobs) == 1 and jobs[0][1][1] == 'srdd_jax.main' else []
  remote, extra = sort_paths(paths, a.sync)
  if a.sync:
    archive = os.path.join('/tmp', f'srdd_jax_{a.name}.tar.gz')
    out.append(['git', '-C', REPO, 'archive', '--format=tar.gz', f'--output={archive}', 'HEAD'])
    out.append(base + ['tpu-vm', 'scp', archive, f'{a.name}:srdd_jax.tar.gz', *where, '--worker=all'])
    unpack = f'tar xzf srdd_jax.tar.gz -C {a.repo_dir}'
    if extra:  # Inputs the config names inside the repository that are not committed: copied too.
      inputs = os.path.join('/tmp', f'srdd_jax_{a.name}_inputs.tar.gz')
      out.append(['tar', '-C', REPO, '-czf', inputs, *extra])
      out.append(base + ['tpu-vm', 'scp', inputs, f'{a.name}:srdd_jax_inputs.tar.gz', *where, '--worker=all'])
      unpack += f' && tar xzf srdd_jax_inputs.tar.gz -C {a.repo_dir}'
    # The image's Python is 3.10 on stock TPU VM images: tpu_host.sh setup provisions 3.11 where needed.
    out.append(ssh + [f'--command=mkdir -p {a.repo_dir} && {unpack} && cd {a.repo_dir} && bash {HOST_SCRIPT} setup'])
  if remote:
    out.append(host('check ' + shlex.join(remote)))
  out.append(host('stop'))
  run = ' && '.join(shlex.join([a.remote_python, *with_multihost(argv)]) for _, argv in jobs)
  env = f'LIBTPU_INIT_ARGS={shlex.quote(a.libtpu_init_args)} ' if a.libtpu_init_args else ''
  out.append(host(f'start {shlex.quote(log_dir(jobs))} {shlex.quote(run)}', env))
  return out


def slurm_script(a, name: str, argv: list[str]) -> str:
  lines = ['#!/usr/bin/env bash', f'#SBATCH --job-name=srdd_{name}', f'#SBATCH --nodes={a.nodes}',
           '#SBATCH --ntasks-per-node=1', f'#SBATCH --gpus-per-node={a.gpus_per_node}', '#SBATCH --exclusive']
  lines += [f'#SBATCH --partition={a.partition}'] if a.partition else []
  lines += [f'#SBATCH --time={a.time}'] if a.time else []
  lines += [f'#SBATCH --output={os.path.join(a.script_dir, f"srdd_{name}_%j.log")}',
            'set -euo pipefail', f'cd {shlex.quote(a.repo_dir)}',
            '# The coordinator is the first node of the job; every task is one process of it.',
            'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            f'export SRDD_COORDINATOR_ADDRESS="$head:{a.port}" SRDD_NUM_PROCESSES="$SLURM_NTASKS"',
            # The command travels as arguments of bash -c, so no quoting of it can break.
            "srun --kill-on-bad-exit=1 bash -c 'SRDD_PROCESS_ID=$SLURM_PROCID exec \"$@\"' srdd " +
            shlex.join([a.remote_python, *argv]), '']
  return '\n'.join(lines)


def slurm_commands(a, jobs) -> tuple[list[list[str]], dict[str, str]]:
  """The sbatch submission (one command; several jobs are chained with afterok, each waiting for the
  one before) and the scripts it submits."""
  scripts = {}
  for name, argv in jobs:
    scripts[os.path.join(a.script_dir, f'srdd_{name}.sbatch')] = slurm_script(a, name, argv)
  paths = list(scripts)
  if len(paths) == 1:
    return [['sbatch', paths[0]]], scripts
  chain = [f'j0=$(sbatch --parsable {shlex.quote(paths[0])})']
  for i, path in enumerate(paths[1:], 1):
    chain.append(f'j{i}=$(sbatch --parsable --dependency=afterok:$j{i - 1} {shlex.quote(path)})')
  chain.append('echo submitted ' + ' '.join(f'$j{i}' for i in range(len(paths))))
  return [['bash', '-c', ' && '.join(chain)]], scripts


def local_commands(a, jobs) -> list[list[str]]:
  out = []
  for _, argv in jobs:
    if a.processes == 1:
      out.append([a.python, *argv])
      continue
    procs = []
    for i in range(a.processes):
      env = (f'XLA_FLAGS=--xla_force_host_platform_device_count={a.devices} JAX_PLATFORMS=cpu '
             f'SRDD_COORDINATOR_ADDRESS=localhost:{a.port} SRDD_NUM_PROCESSES={a.processes} SRDD_PROCESS_ID={i}')
      procs.append(f'{env} {shlex.join([a.python, *argv])} > {shlex.quote(os.path.join(a.log_dir, f"process_{i}.log"))} 2>&1 &')
    out.append(['bash', '-c', f'mkdir -p {shlex.quote(a.log_dir)}; ' + ' '.join(procs) +
                ' s=0; for p in $(jobs -p); do wait $p || s=$?; done; exit $s'])
  return out


# --- the command -------------------------------------------------------------------------------------

def parse(argv):
  main_args = []
  if '--' in argv:
    i = argv.index('--')
    argv, main_args = argv[:i], argv[i + 1:]
  p = argparse.ArgumentParser(prog='launch/launch.py', description=__doc__.split('\n\n')[0])
  sub = p.add_subparsers(dest='backend', required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--plan', default='', help='plan.json of `python -m srdd_jax.scaling plan`: launch every point')
  common.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true', help='print the commands only')
  t = sub.add_parser('tpu', parents=[common], help='a Cloud TPU pod slice')
  t.add_argument('--name', required=True)
  t.add_argument('--zone', required=True)
  t.add_argument('--project', default='')
  t.add_argument('--queued', action='store_true', help='create the slice as a queued resource first')
  t.add_argument('--accelerator', default='', help='with --queued, e.g. v5p-64')
  t.add_argument('--runtime', default='', help='with --queued, the TPU VM runtime version')
  t.add_argument('--spot', action='store_true')
  t.add_argument('--sync', action='store_true', help='copy the repository to every worker and set it up')
  t.add_argument('--repo_dir', default='~/srdd_jax')
  t.add_argument('--remote_python', default='.venv/bin/python')
  t.add_argument('--libtpu_init_args', default=LIBTPU_INIT_ARGS,
                 help="LIBTPU_INIT_ARGS of the run (default: maxtext's v5p set, FSDP's collectives overlapped; '' none)")
  s = sub.add_parser('slurm', parents=[common], help='a SLURM GPU cluster')
  s.add_argument('--nodes', type=int, required=True)
  s.add_argument('--gpus_per_node', type=int, default=8)
  s.add_argument('--partition', default='')
  s.add_argument('--time', default='')
  s.add_argument('--port', type=int, default=PORT)
  s.add_argument('--repo_dir', default=REPO)
  s.add_argument('--remote_python', default='.venv/bin/python')
  s.add_argument('--script_dir', default='', help='where the batch scripts go (default: beside the plan, or .)')
  l = sub.add_parser('local', parents=[common], help='this machine')
  l.add_argument('--processes', type=int, default=1)
  l.add_argument('--devices', type=int, default=1, help='forced CPU devices per process (with --processes > 1)')
  l.add_argument('--port', type=int, default=PORT)
  l.add_argument('--log_dir', default='launch_logs')
  l.add_argument('--python', default=sys.executable or 'python3')
  a = p.parse_args(argv)
  if a.backend == 'slurm':
    if a.nodes < 1:
      p.error(f'--nodes={a.nodes} must be >= 1')
    a.script_dir = a.script_dir or (os.path.dirname(os.path.abspath(a.plan)) if a.plan else os.getcwd())
  if a.backend == 'local' and (a.processes < 1 or a.devices < 1):
    p.error(f'--processes={a.processes} and --devices={a.devices} must be >= 1')
  if a.plan and main_args:
    p.error('give either --plan or srdd_jax.main arguments after --, not both')
  return a, main_args


def main(argv=None) -> int:
  a, main_args = parse(sys.argv[1:] if argv is None else argv)
  try:
    jobs = jobs_from_plan(a.plan, '') if a.plan else main_jobs(main_args)
    scripts = {}
    if a.backend == 'tpu':
      cmds = tpu_commands(a, jobs)
    elif a.backend == 'slurm':
      cmds, scripts = slurm_commands(a, jobs)
    else:
      cmds = local_commands(a, jobs)
  except LaunchError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for path, text in scripts.items():
    if a.dry_run:
      print(f'# {path}\n{text}')
    else:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, 'w') as f:
        f.write(text)
  for cmd in cmds:
    print(shlex.join(cmd), flush=True)
    if a.dry_run:
      continue
    rc = subprocess.run(cmd, check=False).returncode
    if rc:
      print(f'error: exit status {rc} from: {shlex.join(cmd)}', file=sys.stderr)
      return rc
  return 0


if __name__ == '__main__':
  sys.exit(main())
