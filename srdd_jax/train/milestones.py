"""A training task that also exports its model at given steps before the end, from the same run: the model
of step S/2 of a run of S steps (not a run of S/2 steps, whose learning-rate schedule would end there)."""
from __future__ import annotations

import math

from srdd_jax import files
from srdd_jax.config import ConfigError
from srdd_jax.convert.params_io import MODEL_JSON
from srdd_jax.train import driver


class ExportAlso(driver.Task):
  """`task` with exports at `steps` too (WORKDIR/export/step_<n>, the same export as the end's), written
  when the run passes each step. The driver calls `evaluate` every eval_every steps: here the greatest
  common divisor of the task's own interval and those steps, so that the run stops at each of them, and
  the task's own evaluations still run at its own interval and at the end only."""

  def __init__(self, task: driver.Task, steps):
    self.task, self.at = task, sorted({int(s) for s in steps})
    if any(not 0 < s < task.total_steps for s in self.at):
      raise ConfigError(f'{task.steps_key}={task.total_steps}: an export at step(s) {self.at} needs each '
                        'between 0 and the last step')
    for key in ('name', 'steps_key', 'root', 'total_steps', 'global_batch', 'log_every', 'checkpoint_every',
                'keep_checkpoints', 'eval_at_start'):
      setattr(self, key, getattr(task, key))
    self.eval_every = math.gcd(int(task.eval_every), *self.at)

  def path(self, step: int) -> str:
    return files.join(self.root, 'export', f'step_{step:08d}')

  def exports(self) -> dict:
    """{step: its export} once the run has passed them; a ConfigError for one missing (a run resumed past
    the step from a checkpoint saved before the export was complete)."""
    missing = [s for s in self.at if not files.isfile(files.join(self.path(s), MODEL_JSON))]
    if missing:
      raise ConfigError(f'{self.path(missing[0])} is missing or incomplete and the run is past step {missing[0]}: '
                        f'remove {self.root} to train this model again')
    return {s: self.path(s) for s in self.at}

  def abstract_state(self):
    return self.task.abstract_state()

  def init(self):
    return self.task.init()

  def begin(self, start_step: int) -> None:
    self.task.begin(start_step)

  def step(self, state):
    return self.task.step(state)

  def record(self, metrics: dict, steps: int, seconds: float) -> dict:
    return self.task.record(metrics, steps, seconds)

  def progress(self, metrics: dict) -> str:
    return self.task.progress(metrics)

  @property
  def skipped_examples(self) -> int:
    return self.task.skipped_examples

  def evaluate(self, step: int, state, writer) -> dict | None:
    if step in self.at:
      self.task.export(step, state)
    own = int(self.task.eval_every)
    if own and (step % own == 0 or step == self.total_steps):
      return self.task.evaluate(step, state, writer)
    return None

  def export(self, step: int, state) -> str | None:
    return self.task.export(step, state)

  def summary(self) -> dict:
    return self.task.summary()
