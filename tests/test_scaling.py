"""Scaling studies (srdd_jax/modes/scaling.py): the sweep, the plan's FLOPs against XLA's count, the fit on
synthetic runs with a known power law, a real tiny run end to end, and the launchers' dry runs of a plan."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from srdd_jax.modes import scaling
from srdd_jax.config import ConfigError
from tests.conftest import require_libtpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sweep_follows_vars_width_rule_and_checks_its_axes():
  pts = scaling.sweep((2, 4), ('markov', 'causal'), (100,), (0, 500))
  assert len(pts) == 8
  assert {(p.depth, p.width, p.heads) for p in pts} == {(2, 128, 2), (4, 256, 4)}
  assert pts[0].name == 'd2_w128_markov_s100_nall' and pts[3].name == 'd2_w128_causal_s100_n500'
  assert {(p.width, p.heads) for p in scaling.sweep((3,), ('markov',), (1,), (0,), width_per_depth=32)} == {(96, 3)}
  with pytest.raises(ConfigError, match='--depths is empty'):
    scaling.sweep((), ('markov',), (1,), (0,))
  with pytest.raises(ConfigError, match="--masks: 'dense'"):
    scaling.sweep((2,), ('dense',), (1,), (0,))
  with pytest.raises(ConfigError, match='--steps=0'):
    scaling.sweep((2,), ('markov',), (0,), (0,))


def _synthetic_root(tmp_path, laws, noise=0.0):
  """A study root as `run` leaves it: plan.json and each point's metrics.jsonl, whose held-out loss
  follows L = a (C / 1e14)^(-b) + c exactly (or with relative noise)."""
  root = str(tmp_path / 'synthetic')
  rng = np.random.default_rng(0)
  rows = []
  for mask, (a, b, c) in laws.items():
    for i, compute in enumerate(np.logspace(12, 16, 8)):
      name = f'{mask}_{i}'
      wd = os.path.join(root, 'points', name)
      os.makedirs(wd)
      steps = 1000
      loss = a * (compute / 1e14) ** (-b) + c
      loss *= 1 + noise * rng.standard_normal()
      with open(os.path.join(wd, 'metrics.jsonl'), 'w') as f:
        f.write(json.dumps({'step': 500, 'loss': 9.0}) + '\n')
        f.write(json.dumps({'step': 500, 'heldout_loss': loss + 1.0}) + '\n')  # An earlier step: ignored.
        f.write(json.dumps({'step': steps, 'heldout_loss': loss, 'heldout_loss_per_scale': [loss]}) + '\n')
      rows.append({'name': name, 'mask': mask, 'depth': i + 1, 'width': 64 * (i + 1), 'params': 1e6 * (i + 1),
                   'steps': steps, 'examples': 0, 'workdir': wd, 'train_flops_per_step': compute / steps})
  scaling.write_json(os.path.join(root, 'plan.json'), {'format': scaling.FORMAT, 'points': rows})
  return root


def test_fit_recovers_a_known_power_law(tmp_path):
  laws = {'markov': (2.0, 0.25, 1.2), 'causal': (1.5, 0.35, 1.0)}
  out = scaling.fit(_synthetic_root(tmp_path, laws, noise=0.002))
  for mask, (_, b, c) in laws.items():
    f = out['fits'][mask]
    assert abs(f['b'] - b) / b < 0.02, (mask, f)
    assert abs(f['c'] - c) < 0.05 and f['points'] == 8 and f['b_err'] > 0
  assert len(out['runs']) == 16 and all(r['steps'] == 1000 for r in out['runs'])
  md = open(out['outputs']['md']).read()
  assert '| markov | 8 |' in md and 'b' in md
  img = np.asarray(Image.open(out['outputs']['png']))
  assert img.shape == (480, 720, 3) and img.std() > 0
  assert json.load(open(out['outputs']['json']))['fits']['causal']['b'] == f['b']


def test_fit_needs_four_points_and_reports_missing_runs(tmp_path):
  root = _synthetic_root(tmp_path, {'markov': (2.0, 0.3, 1.0)})
  plan = json.load(open(os.path.join(root, 'plan.json')))
  for r in plan['points'][3:]:
    os.remove(os.path.join(r['workdir'], 'metrics.jsonl'))  # Not run yet.
  out = scaling.fit(root)
  assert len(out['runs']) == 3 and 'at least 4' in out['fits']['markov']['error']
  with pytest.raises(ConfigError, match='holds no plan.json'):
    scaling.fit(str(tmp_path / 'nothing'))


@pytest.fixture(scope='module')
def tiny_study(tmp_path_factory, small_tokenizer):
  """A real study on digits (their own 8 px, a given untrained tokenizer): depth 1 x both masks, 6 steps
  each; planned (with the compiled step's memory), then run. (More depths test nothing more here: the fit
  has its own tests on written runs.)"""
  from configs import tokenizer_smoke
  root = str(tmp_path_factory.mktemp('study'))
  vae = small_tokenizer
  c = tokenizer_smoke.get_config()
  c.tokenizer.checkpoint = vae
  c.model.update(num_classes=10, drop_path_rate=0.0, scan=False)
  c.train.update(global_batch=16, steps=6, log_every=3, checkpoint_every=6, keep_checkpoints=1)
  c.optim.update(warmup_steps=1)
  c.tokenize.update(batch_size=64)
  points = scaling.sweep((1,), ('markov', 'causal'), (6,), (0,), width_per_depth=32)
  plan = scaling.plan(c, 'configs/tokenizer_smoke.py', ['--config.train.global_batch=16'], root, points,
                      heldout_examples=64, memory=True)
  scaling.write_json(os.path.join(root, 'plan.json'), plan)
  done = scaling.run_points(c, root, points, heldout_examples=64)
  return root, c, points, plan, done


def test_plan_counts_and_compiled_memory(tiny_study):
  _, _, points, plan, _ = tiny_study
  assert [r['name'] for r in plan['points']] == [p.name for p in points]
  for r, p in zip(plan['points'], points):
    mem = r['memory']
    assert mem['per_chip_bytes'] > 0 and mem['chips'] == 8, mem
    assert r['train_flops'] == r['train_flops_per_step'] * p.steps
    assert r['train_flops_per_token'] * r['seq_len'] * r['batch'] == pytest.approx(r['train_flops_per_step'])
    assert r['params'] > 0 and r['tokens'] == r['batch'] * r['seq_len'] * p.steps
  # The markov mask computes less attention than the causal one at the same size.
  by = {(r['depth'], r['mask']): r for r in plan['points']}
  assert by[(1, 'markov')]['train_flops'] < by[(1, 'causal')]['train_flops']
  assert plan['prepare_command'][1:4] == ['-m', 'srdd_jax.scaling', 'prepare']


@pytest.mark.parametrize('mask', ['markov', 'causal'])
def test_analytic_flops_match_xlas_count(mask):
  """The analytic train-step FLOPs, with the attention pairs the program computes, within 5% of XLA's
  count of the compiled step, at width 384 with 6 heads, the width of depth 6 by VAR's rule (the embedded
  default's data and tokenizer), and 2 blocks: both counts are linear in the depth (every block the
  same program), so 2 blocks check the per-block count that 6 would, at half the compile (measured
  gaps: 3.2% at depth 2, 3.8% at depth 6, either mask).
  Matmuls only are counted: XLA also counts elementwise work (norms, softmax, GELU, the optimizer),
  4.5% at width 384, 5.7% at 256 and 7.3% at 192 (measured), so narrower models are under-counted by
  more than 5%. The plan's count (the pairs the mask keeps, what the fit uses) is at most that."""
  from srdd_jax.bench.base import train_flops
  from configs import fashion_mnist
  c = fashion_mnist.get_config()
  c.mesh.data = 8
  p = scaling.Point(2, 384, 6, mask, 10, 0)
  pc = scaling.apply_overrides(c, scaling.point_overrides(p))
  vc, _ = scaling._var_config(pc)  # pylint: disable=protected-access
  mem = scaling.compiled_memory(pc)
  xla = mem['xla_flops'] * mem['chips']  # XLA counts per device.
  computed = train_flops(vc, 32)['train_per_step']
  assert abs(computed - xla) / xla < 0.05, (computed, xla)
  assert scaling.analytic(vc, 32, 10)['train_flops_per_step'] <= computed


def test_run_writes_heldout_losses_resumes_and_fits(tiny_study, tmp_path):
  root, c, points, plan, done = tiny_study
  assert [d['name'] for d in done] == [p.name for p in points]
  for r in plan['points']:
    h = scaling.last_heldout(os.path.join(r['workdir'], 'metrics.jsonl'))
    assert h['step'] == 6 and h['heldout_examples'] == 64 and np.isfinite(h['heldout_loss'])
  stamps = {p.name: os.path.getmtime(os.path.join(root, 'points', p.name, 'done.json')) for p in points}
  again = scaling.run_points(c, root, points, heldout_examples=64)  # Everything kept.
  assert again == done
  assert stamps == {p.name: os.path.getmtime(os.path.join(root, 'points', p.name, 'done.json')) for p in points}
  out = scaling.fit(root)  # One point per mask: listed, not fitted.
  assert len(out['runs']) == 2 and 'at least 4' in out['fits']['markov']['error']
  # The plan's command of a point is what `run` did: same workdir, the shared stages' paths.
  cmd = plan['points'][0]['command']
  assert cmd[1:4] == ['-m', 'srdd_jax.main', '--config=configs/tokenizer_smoke.py']
  assert f'--workdir={plan["points"][0]["workdir"]}' in cmd and '--mode=train' in cmd
  assert f'--config.train.heldout_cache={plan["shared"]["heldout_cache"]}' in cmd
  assert '--config.train.global_batch=16' in cmd and '--config.model.depth=1' in cmd


def _launch(*args):
  r = subprocess.run([sys.executable, os.path.join(REPO, 'launch', 'launch.py'), *args], capture_output=True,
                     text=True, check=False, cwd=REPO)
  return r.returncode, r.stdout, r.stderr


def test_launchers_dry_run_every_point_of_a_plan(tiny_study, tmp_path):
  _, _, points, plan, _ = tiny_study
  path = str(tmp_path / 'plan.json')
  scaling.write_json(path, plan)
  n = len(points) + 1  # The shared stages (prepare), then the points.
  rc, out, err = _launch('tpu', '--name=pod', '--zone=us-central2-b', f'--plan={path}', '--dry-run')
  assert rc == 0, err
  ssh = [l for l in out.splitlines() if 'tpu-vm ssh pod' in l]
  # The previous run stopped, then one detached chain on every host: the shared stages, then each point.
  assert len(ssh) == 2 and all('--worker=all' in l for l in ssh) and 'tpu_host.sh stop' in ssh[0]
  chain = ssh[1].split(' && ')
  assert len(chain) == n + 1 and 'srdd_jax.scaling --multihost prepare' in chain[1]
  for part, p in zip(chain[2:], points):
    assert f'points/{p.name}' in part and 'srdd_jax.main --multihost' in part
  rc, out, err = _launch('slurm', '--nodes=2', f'--plan={path}', f'--script_dir={tmp_path}', '--dry-run')
  assert rc == 0, err
  assert out.count('#SBATCH --nodes=2') == n and out.count('scontrol show hostnames') == n
  assert 'afterok:$j0' in out and f'afterok:$j{n - 2}' in out
  assert not any(f.endswith('.sbatch') for f in os.listdir(tmp_path))  # A dry run writes nothing.
  rc, out, err = _launch('local', f'--plan={path}', '--dry-run')
  assert rc == 0, err
  lines = out.strip().splitlines()
  assert len(lines) == n and 'srdd_jax.scaling prepare' in lines[0]


def test_launchers_dry_run_one_command_and_bad_input():
  args = ['--', '--config=configs/ffhq.py', '--workdir=gs://bucket/ffhq', '--mode=train',
          '--config.tokenizer.checkpoint=gs://bucket/vae', '--config.data.path=/mnt/ffhq']
  rc, out, err = _launch('tpu', '--name=pod', '--zone=z', '--queued', '--accelerator=v5p-64',
                         '--runtime=v2-alpha-tpuv5', '--sync', '--dry-run', *args)
  assert rc == 0, err
  lines = out.strip().splitlines()
  assert lines[0].startswith('gcloud compute tpus queued-resources create pod-qr --node-id=pod')
  assert 'ACTIVE' in lines[1] and lines[2].startswith('git -C') and 'tpu-vm scp' in lines[3]
  assert 'tpu_host.sh setup' in lines[4] and 'tpu_host.sh check gs://bucket gs://bucket/vae /mnt/ffhq' in lines[5]
  assert 'tpu_host.sh stop' in lines[6] and 'LIBTPU_INIT_ARGS=' in lines[7] and lines[7].endswith(
      "bash launch/tpu_host.sh start gs://bucket/ffhq/logs '\"'\"'.venv/bin/python -m srdd_jax.main --multihost "
      "--config=configs/ffhq.py --workdir=gs://bucket/ffhq --mode=train --config.tokenizer.checkpoint=gs://bucket/vae "
      "--config.data.path=/mnt/ffhq'\"'\"''")
  rc, out, _ = _launch('slurm', '--nodes=4', '--partition=gpu', '--dry-run', *args)
  assert rc == 0 and '#SBATCH --nodes=4' in out and '#SBATCH --partition=gpu' in out
  assert 'SRDD_COORDINATOR_ADDRESS="$head:8476" SRDD_NUM_PROCESSES="$SLURM_NTASKS"' in out
  assert "exec \"$@\"' srdd .venv/bin/python -m srdd_jax.main --config=configs/ffhq.py" in out
  rc, out, _ = _launch('local', '--processes=2', '--devices=4', '--dry-run', *args)
  assert rc == 0 and out.count('SRDD_PROCESS_ID=') == 2 and 'device_count=4' in out
  rc, _, err = _launch('tpu', '--name=pod', '--zone=z', '--queued', '--dry-run', *args)
  assert rc == 2 and '--queued needs --accelerator' in err
  rc, _, err = _launch('local', '--dry-run')
  assert rc == 2 and 'nothing to launch' in err
  rc, _, err = _launch('local', '--plan=/nonexistent/plan.json', '--dry-run')
  assert rc == 2 and "--plan='/nonexistent/plan.json'" in err


def test_local_launch_runs_the_command(tmp_path):
  """Not a dry run: the single-host launcher runs srdd_jax.main (its --dry_run) and passes its status on."""
  rc, out, err = _launch('local', '--', '--config=configs/smoke.py', f'--workdir={tmp_path}', '--mode=train',
                         '--dry_run')
  assert rc == 0, err
  assert '--mode=train' in out and 'global_batch' in out
  rc, _, err = _launch('local', '--', '--config=configs/smoke.py', f'--workdir={tmp_path}', '--mode=nope')
  assert rc != 0 and 'exit status' in err


def test_plan_compiles_each_point_for_a_tpu_topology(tiny_study):
  """--topology: each point's train step compiled here for a TPU slice (v5e:2x2, 4 chips): per-chip memory
  and XLA's FLOPs from the TPU program (skipped, saying why, without libtpu; a failure under CI=true)."""
  require_libtpu()
  root, c, points, _, _ = tiny_study
  p = scaling.plan(c, 'configs/tokenizer_smoke.py', [], root, points[:1], heldout_examples=64, memory=True,
                   topology='v5e:2x2', mesh_shape=(1, -1, 1))
  mem = p['points'][0]['memory']
  assert 'error' not in mem, mem['error']
  assert p['topology'] == 'v5e:2x2' and mem['chips'] == 4 and 'TPU' in mem['device_kind'], mem
  assert mem['per_chip_bytes'] > 0 and mem['xla_flops'] > 0 and mem['fits'] is True
  # The mesh it priced is the one the launched point builds: --mesh reaches the point's command.
  assert mem['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1}, mem
  command = p['points'][0]['command']
  assert {'--config.mesh.data=1', '--config.mesh.fsdp=-1', '--config.mesh.tensor=1'} <= set(command), command


def test_an_unknown_topology_names_the_flag_that_gave_it():
  # With or without libtpu: an unknown name cannot be described either way. Was a RuntimeError about --aot.
  from srdd_jax.config import ConfigError
  from srdd_jax.parallel.compile import topology_devices
  with pytest.raises(ConfigError, match=r"^--topology 'v9z:7x7': cannot describe this TPU topology"):
    topology_devices('v9z:7x7', '--topology')
