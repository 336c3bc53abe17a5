"""Keeping the devices fed: the driver reads a step's metrics one step late (after the next step is
dispatched), except where it must act on them (a log line, an evaluation, a checkpoint, a stop), and a
non-finite step is never saved; batches are placed on the devices ahead of their step."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from srdd_jax.data import pipeline
from srdd_jax.data import preprocess as pp
from srdd_jax.parallel import multihost
from srdd_jax.train import driver


class _Value:
  """A metric whose read (the driver's float() after device_get) is logged, as a device value's wait is."""

  def __init__(self, events, step, value):
    self.events, self.step, self.value = events, step, value

  def __float__(self):
    self.events.append(('read', self.step))
    return float(self.value)


class _Logged(driver.Task):
  """A trainer without a model: the state counts steps; every dispatch and every read is logged."""
  name, global_batch, keep_checkpoints = 'logged', 1, 3

  def __init__(self, root, total=12, log_every=5, checkpoint_every=4, nan_at=None):
    self.root, self.total_steps, self.log_every, self.checkpoint_every = root, total, log_every, checkpoint_every
    self.nan_at, self.events = nan_at, []

  def abstract_state(self):
    return ({'x': jax.ShapeDtypeStruct((), jnp.float32)},
            {'x': jax.sharding.SingleDeviceSharding(jax.devices()[0])})

  def init(self):
    return {'x': jnp.zeros((), jnp.float32)}

  def step(self, state):
    x = state['x'] + 1
    s = int(x)
    self.events.append(('dispatch', s))
    loss = math.nan if s == self.nan_at else float(s)
    return {'x': x}, {'loss': _Value(self.events, s, loss), 'grad_norm': _Value(self.events, s, 1.0)}


def _first(events, event):
  return events.index(event)


def test_metrics_are_read_one_step_late_except_where_the_host_acts(tmp_path):
  task = _Logged(str(tmp_path / 'run'))
  summary = driver.run(task)
  assert summary['complete'] and summary['last_loss'] == 12
  ev = task.events
  saved = {4, 8, 12} | {1}  # checkpoint_every 4 (Orbax also saves a run's first step), and the end.
  acts = {5, 10, 12} | saved  # log_every 5, and the last step.
  for s in range(1, 12):
    if s in acts:  # The host waits for step s before it logs or saves it.
      assert _first(ev, ('read', s)) < _first(ev, ('dispatch', s + 1)), (s, ev)
    else:  # Step s+1 is dispatched before the host waits for step s.
      assert _first(ev, ('dispatch', s + 1)) < _first(ev, ('read', s)), (s, ev)
  assert {e[1] for e in ev if e[0] == 'read'} == set(range(1, 13))  # Every step's metrics checked.
  records = [json.loads(x) for x in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [5, 10, 12] and [r['loss'] for r in records] == [5, 10, 12]
  assert all(r['host_wait_s'] >= 0 for r in records)


def test_a_non_finite_step_read_late_is_never_saved(tmp_path):
  """NaN at step 6 (not a step the host acts on): found while step 7 runs, before step 8's checkpoint."""
  root = tmp_path / 'run'
  task = _Logged(str(root), total=20, log_every=100, checkpoint_every=4, nan_at=6)
  with pytest.raises(driver.NonFiniteLoss, match='at step 6 '):
    driver.run(task)
  assert ('dispatch', 7) in task.events and ('dispatch', 8) not in task.events
  assert sorted(int(p.name) for p in (root / 'checkpoints').iterdir() if p.name.isdigit()) == [1, 4]
  # At a step the host acts on, the NaN stops the run before that step's checkpoint.
  root2 = tmp_path / 'run2'
  task = _Logged(str(root2), total=20, log_every=100, checkpoint_every=4, nan_at=8)
  with pytest.raises(driver.NonFiniteLoss, match='at step 8 '):
    driver.run(task)
  assert ('dispatch', 9) not in task.events
  assert sorted(int(p.name) for p in (root2 / 'checkpoints').iterdir() if p.name.isdigit()) == [1, 4]


def test_batches_are_placed_ahead_of_their_step():
  placed, handed = [], []

  def host():
    for k in range(5):
      yield k

  def place(b):
    placed.append(b)
    return b * 10

  for b in multihost.prefetch_to_devices(host(), place, size=2):
    handed.append(b)
    k = b // 10
    assert min(k + 1, 4) in placed  # When batch k is handed out, batch k+1 is on its way already.
  assert handed == [0, 10, 20, 30, 40] and placed == [0, 1, 2, 3, 4]
  assert list(multihost.prefetch_to_devices(iter(range(3)), lambda b: b, size=0)) == [0, 1, 2]


def test_images_reach_the_devices_as_uint8(tmp_path):
  """The trainers ask their image source for raw pixels (a quarter of float32's bytes) and the step
  normalises them: the training step sees exactly the floats the host would have made."""
  for i in range(4):
    Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(tmp_path / f'{i}.png')
  source = pipeline.build_source({'source': 'folder', 'path': str(tmp_path), 'labels': 'none'}, 16)
  raw, labels = next(source.iterator(0, 0, 4, raw=True))
  floats, same = source.batch(0, 0, 4)
  assert raw.dtype == np.uint8 and raw.nbytes * 4 == floats.nbytes
  np.testing.assert_array_equal(labels, same)
  np.testing.assert_array_equal(np.asarray(jax.jit(pp.to_model_range)(raw)), floats)
