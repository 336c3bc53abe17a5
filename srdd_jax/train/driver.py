"""The training driver every trainer shares: restore-or-init, the step loop, SIGTERM, the non-finite
stop, metrics.jsonl and TensorBoard, one progress line per log step with ETA, periodic and final
checkpoints, evaluations and the export.

A trainer (`Task`) supplies only what is its own: its sharded state, one step (which fetches its
batch), its evaluations and its export. Every batch and random draw of a step is a function of the
step, so a run resumed from a checkpoint continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import importlib
import json
import math
import signal
import time

import jax
from absl import logging

from srdd_jax import files
from srdd_jax.config import ConfigError
from srdd_jax.parallel import multihost, preemption
from srdd_jax.parallel.workdir import TRAINING_INPUTS_FILE, Units
from srdd_jax.train import events
from srdd_jax.train.checkpoint import Checkpointer


# The exit status of a run stopped by SIGTERM or Ctrl-C after saving its checkpoint: not finished, not
# failed; run the same command again to resume (sysexits' EX_TEMPFAIL, which schedulers can requeue).
PREEMPTED_EXIT_CODE = 75


class NonFiniteLoss(FloatingPointError):
  pass


def _keep_metrics_up_to(path: str, step: int) -> None:
  """Drops the records of steps after `step` (and a line cut short by a crash) from metrics.jsonl, so a
  resumed run that repeats those steps never writes a step twice."""
  if not files.exists(path):
    return
  kept, dropped = [], 0
  with files.open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        dropped += 1
        continue
      if isinstance(rec, dict) and int(rec.get('step', -1)) <= step:
        kept.append(line if line.endswith('\n') else line + '\n')
      else:
        dropped += 1
  if dropped:
    files.write_text(path, ''.join(kept))
    logging.info('%s: dropped %d records after step %d (they are computed again)', path, dropped, step)


class Task:
  """What a trainer gives the driver. Subclasses set the attributes and override the methods."""

  name = 'train'  # In log lines.
  steps_key = 'config.train.steps'  # The config key of total_steps, for errors.
  root = ''  # Output directory: checkpoints/, metrics.jsonl, TensorBoard events.
  total_steps = 0
  global_batch = 0
  log_every = 100
  checkpoint_every = 1000
  keep_checkpoints = 3
  eval_every = 0  # Steps between `evaluate` calls (and at the end); 0 = never.
  eval_at_start = False  # Also evaluate before the first step of a fresh run.
  # What the checkpoints are made from (workdir.training_inputs): recorded in ROOT/training_inputs.json,
  # and a resume from other inputs refused naming the change. None: not recorded.
  inputs = None

  def abstract_state(self):
    """(abstract state, its shardings), for restoring a checkpoint on any mesh."""
    raise NotImplementedError

  def init(self):
    """The initial state, created directly in its shardings."""
    raise NotImplementedError

  def begin(self, start_step: int) -> None:
    """Called once before the loop, with the step training resumes from (batch iterators start here)."""

  def step(self, state):
    """One training step: (new state, scalar metrics including 'loss' and 'grad_norm')."""
    raise NotImplementedError

  def record(self, metrics: dict, steps: int, seconds: float) -> dict:
    """Fields a trainer adds to the log record of `steps` steps that took `seconds`."""
    del metrics, steps, seconds
    return {}

  def progress(self, metrics: dict) -> str:
    """The trainer's part of the progress line."""
    return f'loss {metrics["loss"]:.4f}'

  @property
  def skipped_examples(self) -> int:
    return 0

  def evaluate(self, step: int, state, writer) -> dict | None:
    """An evaluation at `step`; a returned dict is written to metrics.jsonl with the step."""
    del step, state, writer
    return None

  def export(self, step: int, state) -> str | None:
    """Writes the finished model; its path. Called once training reaches total_steps."""
    del step, state
    return None

  def summary(self) -> dict:
    """Fields the trainer adds to the run's summary."""
    return {}


class _NoEvents:
  """The writer where clu's cannot be imported: metrics.jsonl keeps every number, TensorBoard gets none."""

  def write_scalars(self, step, scalars):
    del step, scalars

  def write_images(self, step, images):
    del step, images

  def flush(self):
    pass


def _writer(root: str, main_process: bool):
  """TensorBoard on process 0. No logging writer: the progress line is the driver's own, printed once."""
  if not main_process:
    return _NoEvents()
  if files.is_remote(root):
    # clu's writer goes through TensorFlow's file system; a bucket gets the events through ours.
    return events.EventWriter(root)
  try:
    # clu's writers import TensorFlow (seconds): only runs that train pay for it. Where it is not
    # installed (the GPU images the study runs on have TensorBoard but no TensorFlow) clu cannot even
    # be imported; training goes on without event files rather than dying at its first step.
    metric_writers = importlib.import_module('clu.metric_writers')
  except ImportError as e:
    logging.warning('no TensorBoard events in %s: clu\'s writer cannot be imported (%s); metrics.jsonl holds '
                    'every logged number', root, e)
    return _NoEvents()
  return metric_writers.SummaryWriter(root)


def run(task: Task, *, stop_after_steps: int | None = None, return_state: bool = False) -> dict:
  """Trains `task` to its total_steps (or stops after `stop_after_steps` steps of this call, saving)."""
  # With several processes, SIGTERM goes to JAX's notifier for the run (they stop together), and back to
  # the command's own handler after it.
  with preemption.sigterm_to_jax():
    return _run(task, stop_after_steps, return_state)


def _run(task: Task, stop_after_steps: int | None, return_state: bool) -> dict:
  t_start = time.time()
  main_process = multihost.is_main_process()
  if main_process:
    files.makedirs(task.root)
  # A file where a folder belongs, or the reverse: one clear error before Orbax or the metrics writer
  # meet it (they gave tracebacks, and a checkpoints *file* left the process hanging at exit).
  for name, want_dir, what in (('checkpoints', True, 'checkpoints (a folder)'), ('metrics.jsonl', False,
                                'metrics (a file)'), ('export', True, 'export (a folder)')):
    path = files.join(task.root, name)
    if files.exists(path) and files.isdir(path) != want_dir:
      raise ConfigError(f'{path} is a {"file" if want_dir else "folder"} where this run keeps its {what}; '
                        'move it away')
  ckpt = Checkpointer(files.join(task.root, 'checkpoints'), max_to_keep=task.keep_checkpoints,
                      save_every=task.checkpoint_every)
  if task.inputs is not None:
    try:
      Units(task.root, label=task.name, inputs_file=TRAINING_INPUTS_FILE).saved_state(
          'checkpoints', task.inputs, ckpt.directory, saved=ckpt.manager.latest_step() is not None)
    except ConfigError:
      ckpt.close()
      raise
  if preemption.coordinated():
    # The sync counter at the step the restore will give (the newest), during the restore: a notice
    # then names the step after it, not the step after the counter's 0.
    preemption.reached(ckpt.manager.latest_step() or 0)
  abstract, shardings = task.abstract_state()
  state, start = ckpt.restore_or_init(abstract, shardings, task.init)
  if start > task.total_steps:
    ckpt.close()
    # Nothing to train and no export of that length: a scheduler must not see 0 (done) or 75 (retry).
    raise ConfigError(f'{task.steps_key}={task.total_steps}: {ckpt.directory} already holds step {start}; '
                      f'give steps >= {start} to continue this run, or another workdir')
  task.begin(start)
  metrics_path = files.join(task.root, 'metrics.jsonl')
  if main_process:
    _keep_metrics_up_to(metrics_path, start if start else -1)
  writer = _writer(task.root, main_process)
  total = task.total_steps

  def write(rec: dict):
    if main_process:
      files.append_text(metrics_path, json.dumps(rec) + '\n')
      scalars = {k: v for k, v in rec.items() if k != 'step' and isinstance(v, (int, float))}
      writer.write_scalars(rec['step'], scalars)

  def evaluate(step: int):
    rec = task.evaluate(step, state, writer)
    if rec:
      write({'step': step, **rec})

  if task.eval_at_start and start == 0 and task.eval_every > 0:
    evaluate(0)
  stop = {'signal': None}
  # Several processes stop where all of them agree (one signalled process saving alone waited forever
  # for the others at the save's barrier): JAX's notifier hears SIGTERM, and `preemption.reached` names
  # the step. Asking for `start` (again) keeps the counter right where the restore fell back to an
  # older checkpoint.
  coordinated = preemption.coordinated()
  agreed = preemption.reached(start) if coordinated else False
  if coordinated and preemption.python_owns_sigterm():
    logging.warning('a Python SIGTERM handler (%s) hides SIGTERM from JAX\'s preemption notifier: this '
                    'process will not stop the others when it is sent SIGTERM', signal.getsignal(signal.SIGTERM))

  def on_signal(signum, frame):
    del frame
    name = signal.Signals(signum).name
    if name == 'SIGINT' and stop['signal'] == 'SIGINT':
      raise KeyboardInterrupt  # A second Ctrl-C: stop now, without waiting for the step and the save.
    stop['signal'] = name
    if coordinated:
      preemption.notify()
      logging.warning('%s: all %d processes stop at a step they agree on and save a checkpoint (Ctrl-C '
                      'again to abort)', name, jax.process_count())
    else:
      logging.warning('%s: stopping after this step and saving a checkpoint (Ctrl-C again to abort)', name)

  handled = (signal.SIGINT,) if coordinated else (signal.SIGTERM, signal.SIGINT)
  previous = {s: signal.signal(s, on_signal) for s in handled}
  last, step, t_log, n_log, export = None, start, time.time(), 0, None
  # The host reads a step's metrics one step late: step s+1 is dispatched (its batch fetched and sent)
  # before the host waits for step s, so the devices always have the next step queued (maxtext's
  # pattern). Where the host must act on step s itself (a log line, an evaluation, a checkpoint, a stop)
  # it waits for s before acting, so no checkpoint is saved without its metrics checked for NaN.
  pending, waited = None, 0.0

  def read(pending):
    nonlocal waited
    at, device_metrics = pending
    t = time.perf_counter()
    metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    waited += time.perf_counter() - t
    if not (math.isfinite(metrics['loss']) and math.isfinite(metrics['grad_norm'])):
      raise NonFiniteLoss(f'non-finite loss or gradient at step {at} (loss {metrics["loss"]}, grad '
                          f'norm {metrics["grad_norm"]}); the last checkpoint in {ckpt.directory} is kept')
    return metrics

  if agreed:
    stop['signal'] = stop['signal'] or 'SIGTERM'
    logging.info('stopping at step %d, before training (SIGTERM to one of the processes); the checkpoint of '
                 'step %d is there', step, step)
  try:
    while step < total and not agreed:
      state, device_metrics = task.step(state)
      step += 1
      n_log += 1
      if coordinated:
        agreed = preemption.reached(step)
        if agreed and not stop['signal']:
          stop['signal'] = 'SIGTERM'  # Sent to another process; only SIGTERM reaches JAX's notifier.
      logged = step % task.log_every == 0 or step == total
      evaluated = task.eval_every > 0 and (step % task.eval_every == 0 or step == total)
      stopping = bool(agreed or (stop['signal'] and not coordinated) or
                      (stop_after_steps is not None and step - start >= stop_after_steps))
      if pending is not None:
        last = read(pending)
      pending = (step, device_metrics)
      if logged or evaluated or stopping or step == total or ckpt.manager.should_save(step):
        last, pending = read(pending), None
      if logged:
        dt = max(time.time() - t_log, 1e-9)
        rate = n_log / dt
        eta = (total - step) / max(rate, 1e-9)
        write({'step': step, **last, 'steps_per_s': rate, 'eta_s': eta, 'host_wait_s': waited / n_log,
               **task.record(last, n_log, dt), 'examples_seen': step * task.global_batch,
               'skipped_examples': task.skipped_examples})
        if main_process:
          logging.info('%s step %d/%d %s %.2f steps/s ETA %s', task.name, step, total, task.progress(last),
                       rate, _duration(eta))
        t_log, n_log, waited = time.time(), 0, 0.0
      if evaluated:
        evaluate(step)
        t_log = time.time()  # Evaluation time is not training time.
      ckpt.save(step, state, {'step': step})
      if stopping:
        ckpt.save(step, state, {'step': step}, force=True)
        logging.info('stopping at step %d (%s); checkpoint saved', step, stop['signal'] or 'requested')
        break
    if step == total:
      ckpt.save(step, state, {'step': step}, force=True)
  finally:
    ckpt.close()
    for s, handler in previous.items():
      signal.signal(s, handler)
    writer.flush()
  if step == total:
    export = task.export(step, state)
  summary = {'start_step': start, 'end_step': step, 'last_loss': None if last is None else last['loss'],
             **task.summary(), 'export': export, 'seconds': round(time.time() - t_start, 2),
             'workdir': task.root, 'complete': step == total, 'stopped_by': stop['signal']}
  if return_state:
    summary['state'] = state
  return summary


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 60:
    return f'{seconds}s'
  minutes, s = divmod(seconds, 60)
  if minutes < 60:
    return f'{minutes}m{s:02d}s'
  hours, m = divmod(minutes, 60)
  return f'{hours}h{m:02d}m'
