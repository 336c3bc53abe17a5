"""Issue 47 line 2: every stop is a 75. SIGTERM or Ctrl-C at any point of any command (while its libraries
load, during setup, a compilation, tokenizing, sampling, evaluation, a scaling sweep, the study) ends it with
exit status 75, one line and no traceback, the workdir's lock released, nothing half-written put in place;
the same command run again continues. A second Ctrl-C in a training loop aborts: 130, as cleanly.

Every case is a real process. The signal lands at a chosen point: a wrapper (WRAPPER below) runs `python -m
srdd_jax.main` (or .scaling) with one function of the package replaced by one that sends the signal to its
own process on its n-th call, either at once (the handler then runs inside that call) or from a thread a
moment later while the call is in native code (a compilation; a hash standing for one that outlasts the
grace period, after which the watchdog ends the process). (The training loop's own stop, after its step
with a checkpoint: tests/test_reliability.py.)
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from srdd_jax import main
from srdd_jax.parallel import early_stop, preemption
from srdd_jax.parallel.workdir import LOCK_NAME
from srdd_jax.train.driver import PREEMPTED_EXIT_CODE
from tests.conftest import save_small_tokenizer, save_tiny_models, xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRAPPER = r'''
import gc, hashlib, importlib, json, os, runpy, signal, sys, threading
sys.path.insert(0, os.getcwd())  # As `python -m` has it: the repository's configs/ importable.
spec = json.loads(sys.argv[1])
owner = importlib.import_module(spec['module'])
*path, name = spec['attr'].split('.')
for p in path:
  owner = getattr(owner, p)
original = getattr(owner, name)
calls = [0]

def send():
  for _ in range(spec.get('times', 1)):
    os.kill(os.getpid(), getattr(signal, spec['signal']))

def patched(*args, **kwargs):
  calls[0] += 1
  if calls[0] == spec.get('call', 1):
    if spec.get('in_gc_callback'):  # The handler runs inside a garbage-collection callback, as JAX has one.
      def callback(phase, info):
        if phase == 'start' and callback in gc.callbacks:
          gc.callbacks.remove(callback)
          send()
      gc.callbacks.append(callback)
      gc.collect()
    elif spec.get('delay') is None:
      send()  # The handler runs at the next instruction: inside this call, before the original.
    else:
      threading.Timer(spec['delay'], send).start()
      if spec.get('native_iterations'):  # Native code that keeps the GIL released and the handler off.
        hashlib.pbkdf2_hmac('sha256', b'x', b'y', spec['native_iterations'])
  return original(*args, **kwargs)

setattr(owner, name, patched)
sys.argv = [spec['program']] + sys.argv[2:]
runpy.run_module(spec['program'], run_name='__main__', alter_sys=True)
'''


def _env(**extra):
  return dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS='cpu', **extra)


def _stop_at(tmp_path, args, module, attr, sig='SIGTERM', program='srdd_jax.main', env=None, **how):
  """`python -m program args` with `sig` sent when module.attr is called (`how`: call, delay, times,
  native_iterations): (returncode, stdout, stderr, seconds)."""
  wrapper = tmp_path / 'stop_at.py'
  wrapper.write_text(WRAPPER)
  spec = {'module': module, 'attr': attr, 'signal': sig, 'program': program, **how}
  t0 = time.time()
  r = subprocess.run([sys.executable, str(wrapper), json.dumps(spec), *args], cwd=REPO, env=env or _env(),
                     capture_output=True, text=True, timeout=600)
  return r.returncode, r.stdout, r.stderr, time.time() - t0


def _run(args, program='srdd_jax.main'):
  r = subprocess.run([sys.executable, '-m', program, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                     timeout=600)
  return r.returncode, r.stdout, r.stderr


def _problems(name, result, sig, *workdirs, status=PREEMPTED_EXIT_CODE, line='stopped by'):
  """What is wrong with a stopped command's `result` (returncode, stdout, stderr, ...)."""
  rc, out, err = result[:3]
  out_of = f'{name}: exit {rc}; stderr ends {err[-1500:]!r}'
  problems = []
  if rc != status:
    problems.append(f'{out_of}: not {status}')
  if 'Traceback' in out + err:
    problems.append(f'{out_of}: a traceback')
  if not any(l.startswith(line) and (sig in l or line == 'aborted') for l in err.splitlines()):
    problems.append(f'{out_of}: no line "{line} {sig}"')
  problems += [f'{name}: {w}/{LOCK_NAME} left' for w in workdirs if os.path.exists(os.path.join(w, LOCK_NAME))]
  return problems


def test_the_stop_statuses_are_one_number():
  assert early_stop.STOPPED_EXIT_CODE == preemption.STOPPED_EXIT_CODE == PREEMPTED_EXIT_CODE == 75
  assert preemption.ABORTED_EXIT_CODE == 130
  assert preemption.exit_of(preemption.Interrupted('SIGTERM'))[0] == 75
  assert preemption.exit_of(KeyboardInterrupt())[0] == 130
  # A process that runs commands in-process (a test, a notebook) keeps its own handlers: main.run never
  # installs any.
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  assert main.run(['srdd_jax.main', '--config=configs/smoke.py', '--workdir=/nonexistent/x', '--dry_run']) == 0
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


SMOKE = ['--config=configs/smoke.py', '--config.mesh.data=8']


def test_stops_while_loading_setting_up_and_compiling(tmp_path):
  """Issue 47: SIGINT during setup or compile ended in a traceback (exit 130); SIGTERM there killed the
  process (143) and left .srdd.lock behind."""
  models = tmp_path / 'models'
  var, vae = save_tiny_models(str(models))
  sample = ['--config=configs/sample.py', '--mode=sample', f'--config.model.checkpoint={var}',
            f'--config.tokenizer.checkpoint={vae}', '--config.sample.classes=0,1', '--config.sample.num_per_class=4',
            '--config.sample.batch_size=8', '--config.sampler.top_k=0', '--config.sampler.top_p=0']

  def loading(sig):  # A second into the command: Python is loading JAX and the rest.
    wd = tmp_path / f'loading_{sig}'
    p = subprocess.Popen([sys.executable, '-m', 'srdd_jax.main', *SMOKE, f'--workdir={wd}'], cwd=REPO, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    p.send_signal(getattr(signal, sig))
    out, err = p.communicate(timeout=300)
    return (p.returncode, out, err), wd

  cases = {
      # During setup: the command's validation, before the workdir exists.
      'setup SIGINT': lambda wd: _stop_at(tmp_path, [*SMOKE, f'--workdir={wd}'], 'srdd_jax.modes.checks', 'validate',
                                          'SIGINT'),
      'setup SIGTERM': lambda wd: _stop_at(tmp_path, [*SMOKE, f'--workdir={wd}'], 'srdd_jax.modes.checks', 'validate'),
      # Where an exception cannot propagate (it is printed and dropped): the stop was lost and the run went
      # on to exit 0 (seen with JAX's garbage-collection callback). It is raised again just after.
      'gc SIGTERM': lambda wd: _stop_at(tmp_path, [*SMOKE, f'--workdir={wd}'], 'srdd_jax.modes.checks', 'validate',
                                        in_gc_callback=True),
      # During the sampler's first batch: tracing and compiling it (the handler runs when XLA returns).
      'compile SIGINT': lambda wd: _stop_at(tmp_path, [*sample, f'--workdir={wd}'], 'srdd_jax.modes.sample',
                                            'generate', 'SIGINT', delay=0.5),
      # Native code that outlasts the grace period (1 s here): the watchdog ends the process, lock released.
      'native SIGTERM': lambda wd: _stop_at(tmp_path, [*sample, f'--workdir={wd}'], 'srdd_jax.modes.sample',
                                            'generate', delay=0.3, native_iterations=30_000_000,
                                            env=_env(SRDD_STOP_GRACE_SECONDS='1')),
  }
  problems = []
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = {sig: pool.submit(loading, sig) for sig in ('SIGINT', 'SIGTERM')}
    futures.update({name: pool.submit(fn, tmp_path / name.replace(' ', '_')) for name, fn in cases.items()})
    results = {name: f.result() for name, f in futures.items()}
  for sig in ('SIGINT', 'SIGTERM'):
    result, wd = results[sig]
    problems += _problems(f'loading {sig}', result, sig, wd)
  for name, result in results.items():
    if name in ('SIGINT', 'SIGTERM'):
      continue
    wd = tmp_path / name.replace(' ', '_')
    problems += _problems(name, result, name.split()[1], wd)
    if name.startswith('setup') and wd.exists():
      problems.append(f'{name}: {wd} was created')
    if not name.startswith(('setup', 'gc')) and any((wd / d).exists() for d in ('samples', 'samples.partial')):
      problems.append(f'{name}: samples were written: {os.listdir(wd)}')
  # The watchdog's line, and an end long before the native call's own (~20 s on this machine).
  rc, _, err, seconds = results['native SIGTERM']
  if 'did not leave native code (compilation, a device wait) within 1 s' not in err:
    problems.append(f'native SIGTERM: no watchdog line: {err[-800:]!r}')
  assert not problems, '\n'.join(problems)


def test_a_stopped_tokenize_keeps_whole_shards_and_resumes(tmp_path):
  """Issue 47: SIGTERM in the tokenize stage of --mode=all exited 143. Stopped before its second shard is
  written (--mode=tokenize, and the same stage of --mode=all): 75; the first shard whole, no manifest, no
  temporary file; the rerun keeps the shard and completes the cache. --mode=all records no tokenize stage."""
  wd = tmp_path / 'tokenize'
  args = [*SMOKE, '--mode=tokenize', f'--workdir={wd}', '--config.tokenize.shard_size=24']
  all_wd = tmp_path / 'all'
  all_args = ['--config=configs/fashion_mnist.py', '--mode=all', f'--workdir={all_wd}', '--config.sample.batch_size=40',
              '--config.tokenize.max_examples=64', '--config.tokenize.shard_size=32', '--config.tokenize.batch_size=32']
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    stopped = pool.submit(_stop_at, tmp_path, args, 'srdd_jax.files', 'save_npz', call=2)
    stopped_all = pool.submit(_stop_at, tmp_path, all_args, 'srdd_jax.files', 'save_npz', 'SIGINT', call=2)
    stopped, stopped_all = stopped.result(), stopped_all.result()
  problems = _problems('tokenize', stopped, 'SIGTERM', wd) + _problems('all', stopped_all, 'SIGINT', all_wd)
  assert not problems, '\n'.join(problems)
  for root in (wd / 'tokens', all_wd / 'tokens'):
    assert sorted(os.listdir(root)) == ['shard_00000.npz'], os.listdir(root)
  stages = json.load(open(all_wd / 'stages.json'))
  assert 'tokenize' not in stages, stages
  rc, out, err = _run(args)
  assert rc == 0, err[-2000:]
  summary = json.loads(out[out.index('{'):])
  assert (summary['shards_kept'], summary['shards_written']) == (1, 2)


def test_stopped_sampling_and_evaluation_leave_the_old_outputs(tmp_path):
  """Ctrl-C in --mode=sample ended in a traceback (issue 47). Stopped while its images are being written
  (--overwrite): 75, the earlier samples as they were, no lock; the rerun replaces them whole. A stop in
  --mode=eval before its metrics: 75, no evaluation written."""
  var, vae = save_tiny_models(str(tmp_path / 'models'))
  wd = tmp_path / 'run'
  args = ['--config=configs/sample.py', '--mode=sample', f'--workdir={wd}', f'--config.model.checkpoint={var}',
          f'--config.tokenizer.checkpoint={vae}', '--config.sample.classes=0,1', '--config.sample.num_per_class=4',
          '--config.sample.batch_size=8', '--config.sampler.top_k=0', '--config.sampler.top_p=0']
  assert main.run(['srdd_jax.main', *args]) == 0
  tree = lambda: {os.path.join(d, f): open(os.path.join(d, f), 'rb').read() for d, _, fs in os.walk(wd / 'samples')
                  for f in fs}
  before = tree()
  samples = tmp_path / 'fashion.npz'
  rng = np.random.default_rng(0)
  np.savez(samples, arr_0=rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8), arr_1=np.arange(20) % 10)
  eval_wd = tmp_path / 'eval'
  eval_args = ['--config=configs/fashion_mnist.py', '--mode=eval', f'--workdir={eval_wd}',
               f'--config.eval.samples={samples}']
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    sampled = pool.submit(_stop_at, tmp_path, args + ['--config.sampler.cfg=2', '--overwrite'], 'srdd_jax.files',
                          'save_image', 'SIGINT', call=3)
    evaluated = pool.submit(_stop_at, tmp_path, eval_args, 'srdd_jax.evaluation.protocol', 'proxy_metrics')
    sampled, evaluated = sampled.result(), evaluated.result()
  problems = _problems('sample', sampled, 'SIGINT', wd) + _problems('eval', evaluated, 'SIGTERM', eval_wd)
  assert not problems, '\n'.join(problems)
  assert tree() == before  # The old samples, whole; the new ones were in samples.partial.
  assert not (eval_wd / 'eval').exists()
  rc, _, err = _run(args + ['--config.sampler.cfg=2', '--overwrite'])
  assert rc == 0, err[-2000:]
  assert not (wd / 'samples.partial').exists() and tree() != before
  assert json.load(open(wd / 'samples' / 'summary.json'))['sampler']['cfg'] == 2.0


def test_a_second_ctrl_c_in_training_aborts_cleanly(tmp_path):
  """The driver's loop turns a second Ctrl-C into KeyboardInterrupt (stop now, without the stop's save): exit
  130 and one line, no traceback, the lock released; the rerun resumes from the last checkpoint."""
  wd = tmp_path / 'run'
  args = [*SMOKE, f'--workdir={wd}', '--config.train.steps=12', '--config.train.checkpoint_every=5']
  result = _stop_at(tmp_path, args, 'srdd_jax.train.transformer_task', 'TransformerTask.step', 'SIGINT', call=8,
                    times=2)
  problems = _problems('second Ctrl-C', result, 'SIGINT', wd, status=130, line='aborted')
  assert not problems, '\n'.join(problems)
  assert max(int(d) for d in os.listdir(wd / 'checkpoints') if d.isdigit()) == 5  # Not the stop's (8).
  rc, _, err = _run(args)
  assert rc == 0, err[-2000:]


def _study_config(path, tokenizer):
  """A config file of the study's tiny run (tests/test_study.py's), for a real process."""
  path.write_text(f'''
import ml_collections
from configs import tokenizer_smoke


def get_config(arg=None):
  c = tokenizer_smoke.get_config()
  c.tokenizer.checkpoint = {tokenizer!r}
  c.model.update(depth=1, width=32, heads=1, num_classes=10, mask='markov', drop_path_rate=0.0, scan=False)
  c.train.update(global_batch=16, steps=4, log_every=2, checkpoint_every=4, keep_checkpoints=1)
  c.optim.update(base_lr=0.5, warmup_steps=1)
  c.tokenize.update(batch_size=64)
  c.sampler.update(top_k=0, top_p=0.0)
  c.eval.update(batch_size=16, proxy_epochs=1, proxy_examples=100)
  c.ablation = ml_collections.ConfigDict(dict(
      arms='headline', train_seeds='0', sample_seeds='0', cfg_grid='1.5', schedules='linear',
      val_per_class=1, test_per_class=1, timing_repeats=1, heldout_points=1, heldout_examples=64,
      mr_thresholds='0.05', mr_iterations='2', truncations='top_p=0.9', quick=True))
  return c
''')
  return str(path)


def test_stops_in_a_scaling_sweep_and_in_the_study(tmp_path):
  """Issue 47: SIGTERM in `scaling run` exited 1 (the point's stop became a SystemExit). A stop in a point's
  training (after its step, its checkpoint saved) and one in the sweep's token cache stage: 75, ROOT's and
  the point's locks released; the rerun completes the sweep. The study stopped in its token caches: 75."""
  tokenizer = save_small_tokenizer(str(tmp_path / 'tok'))
  root = tmp_path / 'sweep'
  sweep = ['run', '--config=configs/tokenizer_smoke.py', f'--workdir={root}', '--depths=1', '--masks=markov',
           '--steps=4', '--width_per_depth=32', f'--config.tokenizer.checkpoint={tokenizer}',
           '--config.model.num_classes=10', '--config.train.global_batch=16', '--config.train.checkpoint_every=2',
           '--config.train.log_every=1', '--heldout_examples=32']
  point = root / 'points' / 'd1_w32_markov_s4_nall'
  caches = tmp_path / 'sweep2'
  caches_args = [a.replace(str(root), str(caches)) for a in sweep]
  study_wd = tmp_path / 'study'
  study = [f'--config={_study_config(tmp_path / "study_config.py", tokenizer)}', '--mode=study',
           f'--workdir={study_wd}']
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    in_training = pool.submit(_stop_at, tmp_path, sweep, 'srdd_jax.train.transformer_task', 'TransformerTask.step',
                              call=3, program='srdd_jax.scaling')
    in_caches = pool.submit(_stop_at, tmp_path, caches_args, 'srdd_jax.files', 'save_npz', 'SIGINT',
                            program='srdd_jax.scaling')
    in_study = pool.submit(_stop_at, tmp_path, study, 'srdd_jax.modes.tokenize', 'run')  # Its token caches.
    in_training, in_caches, in_study = in_training.result(), in_caches.result(), in_study.result()
  problems = (_problems('scaling training', in_training, 'SIGTERM', root, point) +
              _problems('scaling caches', in_caches, 'SIGINT', caches) +
              _problems('study', in_study, 'SIGTERM', study_wd))
  assert not problems, '\n'.join(problems)
  assert 'point d1_w32_markov_s4_nall at step 3, its checkpoint saved' in in_training[2]
  assert sorted(d for d in os.listdir(point / 'checkpoints') if d.isdigit())[-1] == '3'
  assert not (point / 'done.json').exists()
  assert not any(os.path.exists(os.path.join(caches, 'tokens', d, 'manifest.json')) for d in ('train_all', 'heldout'))
  rc, out, err = _run(sweep, program='srdd_jax.scaling')
  assert rc == 0, err[-2000:]
  steps = [r['step'] for r in map(json.loads, open(point / 'metrics.jsonl')) if 'loss' in r]
  assert steps == [1, 2, 3, 4], steps  # Resumed after step 3, each step trained once.
