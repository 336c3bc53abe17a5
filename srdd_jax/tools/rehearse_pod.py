"""A pod dress rehearsal on one machine: the users' training command on CPU processes that play the hosts
of a TPU slice, against one process with as many devices.

  python -m srdd_jax.tools.rehearse_pod --topology=v5p:2x4x4 --workdir=/tmp/rehearsal --out=R.json
  python -m srdd_jax.tools.rehearse_pod --topology=v5p:2x2x2 --slices=2 --workdir=/tmp/r2

libtpu describes the slice (each chip's coordinates, host and slice, as on the pod); the run starts one
process per host with that host's number of CPU devices, and `SRDD_REHEARSE_TOPOLOGY` makes every process
build its mesh from those descriptions with JAX's own device-mesh builder, so each process holds the batch
rows (often several scattered spans), parameter shards and collectives of its host on the pod. Beside it,
one process with all the devices in their plain order trains the same steps. The record compares the two
step by step (loss, gradient norm) and leaf by leaf (the exported parameters), and lists each host's rows.

What it cannot show: the chips' speed, their memory, the interconnect, libtpu's runtime. Those need a pod.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from srdd_jax.config import ConfigError
from srdd_jax.convert import params_io
from srdd_jax.parallel import mesh as pm
from srdd_jax.parallel import multihost
from srdd_jax.parallel.workdir import WorkdirLock

REPO = epath.Path(__file__).resolve().parent.parent.parent
SMOKE = ['--config=configs/smoke.py', '--mode=train', '--config.model.depth=1']
# The most hosts (slices x hosts per slice) a rehearsal plays. Each is a whole JAX process on this one
# machine that compiles and runs the step itself, so what a count needs is not knowable in advance; the
# bound is a count a rehearsal is known to be made of: benchmarks/pod_rehearsal.sh's largest slice,
# v5p-256, is 32 hosts (the records up to v5p-64's 8 took 2 cores and 24 GB), and twice that leaves room
# for a larger machine. Unbounded, a large --slices started a process for every host of every slice.
MAX_PROCESSES = 64


def host_rows(topology: str, slices: int, mesh_shape, global_batch: int) -> dict:
  """{host: [[start, stop], ...]}: the batch rows each host of the slice loads under the mesh."""

  tpu = pm.topology_devices(topology, '--topology', num_slices=slices)
  mesh = pm.make_mesh(mesh_shape, tpu)
  layout = pm.describe(tpu)
  sharding = NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))
  out = {}
  for p in sorted({d.process_index for d in tpu}):
    spans = multihost.rows_of(sharding, global_batch, [d for d in tpu if d.process_index == p])
    out[p] = [[s.start, s.stop] for s in spans]
  return {'mesh': dict(mesh.shape), 'hosts': len(out), 'chips_per_host': len(tpu) // len(out), 'rows': out,
          'layout': layout}


def _records(workdir: epath.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines() if line.strip()]


def _export(workdir: epath.Path, steps: int):
  _, params = params_io.load_params(str(workdir / 'export' / f'step_{steps:08d}'))
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def compare(one: epath.Path, many: epath.Path, steps: int) -> dict:
  a, b = _records(one), _records(many)
  if [r['step'] for r in a] != [r['step'] for r in b]:
    raise SystemExit(f'error: the runs logged different steps: {[r["step"] for r in a]} vs {[r["step"] for r in b]}')
  loss_a, loss_b = np.array([r['loss'] for r in a]), np.array([r['loss'] for r in b])
  gn_a, gn_b = np.array([r['grad_norm'] for r in a]), np.array([r['grad_norm'] for r in b])
  pa, pb = _export(one, steps), _export(many, steps)
  if sorted(pa) != sorted(pb):
    raise SystemExit('error: the exports hold different parameter trees')
  diffs = {k: float(np.max(np.abs(pa[k].astype(np.float64) - pb[k].astype(np.float64)))) for k in pa}
  scale = {k: float(np.max(np.abs(pa[k]))) for k in pa}
  worst = max(diffs, key=lambda k: diffs[k] / max(scale[k], 1e-30))
  # Adam moves a parameter by at most about the learning rate a step, whatever its gradient's size: a leaf
  # whose gradient is near zero (a bias that starts at 0) turns reduction-order noise into a fraction of
  # that move, which is large next to the leaf's own scale but small next to the steps' summed rates.
  lr_sum = float(sum(r['lr'] for r in a))
  return {'steps': [r['step'] for r in a], 'loss_one': loss_a.tolist(), 'loss_many': loss_b.tolist(),
          'loss_max_rel_diff': float(np.max(np.abs(loss_a - loss_b) / np.abs(loss_a))),
          'grad_norm_max_rel_diff': float(np.max(np.abs(gn_a - gn_b) / np.abs(gn_a))),
          'loss_bit_identical': bool(np.array_equal(loss_a, loss_b)),
          'param_leaves': len(pa), 'param_leaves_bit_identical': sum(np.array_equal(pa[k], pb[k]) for k in pa),
          'param_max_abs_diff': max(diffs.values()), 'param_worst_leaf': worst,
          'param_worst_rel_diff': diffs[worst] / max(scale[worst], 1e-30),
          'lr_sum': lr_sum, 'param_max_diff_in_lr_sum': max(diffs.values()) / lr_sum}


class RehearsalFailed(RuntimeError):
  """A run of the rehearsal exited with an error: the rehearsal failed (exit 1), its input was fine."""


def rehearse(topology: str, slices: int, workdir: str, steps: int, global_batch: int, mesh: str,
             python: str = sys.executable, extra=()) -> dict:
  root = epath.Path(workdir)
  rows = host_rows(topology, slices, [int(v) for v in mesh.split(',')], global_batch)
  hosts, per_host = rows['hosts'], rows['chips_per_host']
  # The processes lay the slice out from this file (the same descriptions) instead of each loading libtpu:
  # 16 processes with libtpu took 1.4 GB each, the whole machine.
  root.mkdir(parents=True, exist_ok=True)
  layout = root / 'layout.json'
  layout.write_text(json.dumps(rows.pop('layout')))
  chips = hosts * per_host
  vae = root / 'vae'
  if not (vae / 'model.json').exists():
    subprocess.run([python, '-c', _SAVE_TOKENIZER, str(vae)], cwd=REPO, check=True,
                   env=dict(os.environ, JAX_PLATFORMS='cpu'))
  data, fsdp, tensor = mesh.split(',')
  args = [*SMOKE, f'--config.train.steps={steps}', f'--config.train.checkpoint_every={steps}',
          f'--config.train.global_batch={global_batch}', f'--config.tokenizer.checkpoint={vae}',
          f'--config.data.num_examples={max(64, 2 * global_batch)}',
          f'--config.mesh.data={data}', f'--config.mesh.fsdp={fsdp}', f'--config.mesh.tensor={tensor}', *extra]
  env = dict(os.environ, PYTHON=python, JAX_PLATFORMS='cpu')
  env.pop(pm.ENV_REHEARSE, None)
  env.pop(pm.ENV_REHEARSE_LAYOUT, None)
  flags = ' '.join(f for f in env.get('XLA_FLAGS', '').split() if 'device_count' not in f)
  t0 = time.time()
  # Both at once: on a 2-core machine their compiles overlap the other's start-up.
  one = subprocess.Popen([python, '-m', 'srdd_jax.main', f'--workdir={root / "one"}', *args], cwd=REPO,
                         env=dict(env, XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count={chips}'),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  name = topology + (f',slices={slices}' if slices > 1 else '')
  rehearsal = {pm.ENV_REHEARSE: name, pm.ENV_REHEARSE_LAYOUT: str(layout), multihost.ENV_HEARTBEAT: '1800'}
  many = subprocess.run(['bash', 'launch/local.sh', str(hosts), str(per_host), str(root / 'logs'), '--',
                         f'--workdir={root / "many"}', *args], cwd=REPO, capture_output=True, text=True,
                        env=dict(env, XLA_FLAGS=flags, **rehearsal))
  out_one, _ = one.communicate()
  seconds = time.time() - t0
  if one.returncode or many.returncode:
    logs = ''.join((root / 'logs' / f'process_{i}.log').read_text()[-1500:] for i in range(min(hosts, 2))
                   if (root / 'logs' / f'process_{i}.log').exists())
    report = root / 'failure.log'
    report.write_text(f'single process exit {one.returncode}, {hosts} processes exit {many.returncode}\n'
                      f'--- single process ---\n{out_one[-4000:]}\n--- launch/local.sh ---\n{many.stderr[-2000:]}\n'
                      f'--- process logs ---\n{logs}\n')
    raise RehearsalFailed(f'the rehearsal\'s runs failed (single process exit {one.returncode}, {hosts} processes '
                          f'exit {many.returncode}); their output: {report}')
  log0 = (root / 'logs' / 'process_0.log').read_text()
  return {'topology': topology, 'slices': slices, 'chips': chips, 'processes': hosts, 'global_batch': global_batch,
          'steps': steps, 'mesh_request': mesh, **rows, 'rehearsed_mesh_logged': pm.ENV_REHEARSE in log0,
          **compare(root / 'one', root / 'many', steps), 'seconds': round(seconds, 1)}


# A tokenizer saved once: every process loads it instead of initialising one (seconds of small compiles).
_SAVE_TOKENIZER = '''
import sys, jax
from srdd_jax.convert import params_io
from srdd_jax.tokenizer.api import Tokenizer, tokenizer_config, unbox
from srdd_jax.config import load_file
vq = tokenizer_config(load_file('configs/smoke.py'))
params = jax.device_get(jax.jit(lambda k: unbox(Tokenizer(vq).init(k)))(jax.random.PRNGKey(1)))
params_io.save_params(sys.argv[1], params, kind='vqvae', config=vq)
'''


def _problem(a) -> str | None:
  """Why the flags cannot make a rehearsal, or None: found before libtpu loads and both runs start
  (minutes), not when the record is written at the end."""
  for flag, least in (('slices', 1), ('steps', 1), ('global_batch', 0)):
    if getattr(a, flag) < least:
      return f'--{flag}={getattr(a, flag)}: must be >= {least}' + (' (0: 2 rows per chip)' if least == 0 else '')
  if a.slices > MAX_PROCESSES:  # Every slice has a host at least; before libtpu describes them all.
    return (f'--slices={a.slices}: at most {MAX_PROCESSES} (the rehearsal starts a process for every host of every '
            f'slice, at most {MAX_PROCESSES} on one machine)')
  sizes = a.mesh.split(',')
  if len(sizes) != 3 or not all(re.fullmatch(r'-?\d+', v.strip()) for v in sizes):
    return f'--mesh={a.mesh!r}: expected three integers data,fsdp,tensor (-1: the rest of the devices)'
  root = epath.Path(a.workdir)
  for p in (root, *root.parents):  # The nearest part of --workdir that exists must be a folder.
    if p.exists():
      if not p.is_dir():
        return f'--workdir={a.workdir!r}: {str(p)!r} is a file, not a folder'
      break
  if a.out:
    out = epath.Path(a.out)
    if out.is_dir():
      return f'--out={a.out!r} is a folder; name the JSON file to write'
    if not out.parent.is_dir():
      return f'--out={a.out!r}: the folder {str(out.parent)!r} does not exist'
  return None


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  ap.add_argument('--topology', required=True, help="a TPU slice libtpu can describe, e.g. v5p:2x4x4 (v5p-64)")
  ap.add_argument('--slices', type=int, default=1, help='slices of that topology joined by the data-centre network')
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--steps', type=int, default=3)
  ap.add_argument('--global_batch', type=int, default=0, help='default: 2 rows per chip')
  ap.add_argument('--mesh', default='-1,-1,1', help="data,fsdp,tensor (default: the pod presets' mesh)")
  ap.add_argument('--out', default='', help='also write the record (JSON) here')
  a = ap.parse_args(argv)
  problem = _problem(a)
  if problem:
    print(f'error: {problem}', file=sys.stderr)
    return 2
  try:
    tpu = pm.topology_devices(a.topology, '--topology', num_slices=a.slices)
    hosts = len({d.process_index for d in tpu})
    if hosts > MAX_PROCESSES:
      flag = f'--slices={a.slices}' if a.slices > 1 else f'--topology={a.topology}'
      raise ConfigError(f'{flag}: {hosts} hosts ({a.slices} slice(s) of {a.topology}); the rehearsal starts a '
                        f'process for each on this machine, at most {MAX_PROCESSES}')
    try:
      sizes = pm.resolve_mesh_shape([int(v) for v in a.mesh.split(',')], len(tpu), a.slices)
    except ValueError as e:
      raise ConfigError(f'--mesh={a.mesh!r}: {e}') from None
    a.global_batch = a.global_batch or 2 * len(tpu)
    if a.global_batch % (sizes[0] * sizes[1]):
      # Both runs would refuse it, each after its start-up: the batch is split over data x fsdp.
      raise ConfigError(f'--global_batch={a.global_batch}: must be a multiple of the mesh\'s data x fsdp = '
                        f'{sizes[0] * sizes[1]} ({a.topology}, --mesh={a.mesh})')
    epath.Path(a.workdir).mkdir(parents=True, exist_ok=True)
    # The rehearsal's root (its layout, tokenizer and both runs' workdirs) is one run's at a time.
    with WorkdirLock(a.workdir):
      rec = rehearse(a.topology, a.slices, a.workdir, a.steps, a.global_batch, a.mesh)
  except (ConfigError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except RehearsalFailed as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  text = json.dumps(rec, indent=1)
  print(text)
  if a.out:
    epath.Path(a.out).write_text(text + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
