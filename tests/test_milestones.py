"""srdd_jax/train/milestones.py: the driver stops at every export step, the export comes from the state of
that step, and the task's own evaluations keep their interval (the study's S/2 model, tests/test_study.py,
runs it through the driver)."""
import pytest

from srdd_jax.config import ConfigError
from srdd_jax.train import driver
from srdd_jax.train.milestones import ExportAlso


class _Task(driver.Task):
  total_steps, eval_every, root = 12, 4, '/nowhere'

  def __init__(self):
    self.exported, self.evaluated = [], []

  def export(self, step, state):
    self.exported.append((step, state))
    return f'export {step}'

  def evaluate(self, step, state, writer):
    self.evaluated.append(step)
    return {'heldout_loss': float(step)}


def test_exports_at_the_given_steps_and_keeps_the_tasks_own_evaluations():
  inner = _Task()
  task = ExportAlso(inner, [6])
  assert task.eval_every == 2 and (task.total_steps, task.root) == (12, '/nowhere')  # gcd(4, 6).
  # The driver calls evaluate every eval_every steps and at the end, with that step's state.
  records = {s: task.evaluate(s, f'state {s}', None) for s in range(1, 13) if s % task.eval_every == 0 or s == 12}
  assert inner.exported == [(6, 'state 6')]
  assert inner.evaluated == [4, 8, 12] and records[4] == {'heldout_loss': 4.0} and records[6] is None
  assert ExportAlso(_Task(), [3, 9]).eval_every == 1
  without = _Task()
  without.eval_every = 0  # A task that never evaluates: only the export steps and the end.
  wrapped = ExportAlso(without, [6])
  assert wrapped.eval_every == 6 and wrapped.evaluate(12, 's', None) is None and without.evaluated == []


@pytest.mark.parametrize('steps', [[0], [12], [13]])
def test_an_export_step_outside_the_run_is_refused(steps):
  with pytest.raises(ConfigError, match='needs each between 0 and the last step'):
    ExportAlso(_Task(), steps)


def test_a_missing_export_past_its_step_names_the_folder(tmp_path):
  inner = _Task()
  inner.root = str(tmp_path)
  with pytest.raises(ConfigError, match='step_00000006 is missing or incomplete and the run is past step 6'):
    ExportAlso(inner, [6]).exports()
