"""Orbax checkpoints of the train state: async saves, keep the last N, restore into a sharded
abstract state (so a run can resume on another mesh), and skip a checkpoint that cannot be read.
In a bucket (gs://) Orbax writes each step in place and commits it with its marker file, and so the
checks here trust a step there only once that marker exists."""
from __future__ import annotations

import time

import jax
import orbax.checkpoint as ocp
from absl import logging

from srdd_jax import files
from srdd_jax.config import ConfigError
from srdd_jax.parallel import multihost
from srdd_jax.parallel.workdir import check_space


class CheckpointMismatch(ConfigError):
  """A complete checkpoint whose contents do not fit the configured train state."""


class Checkpointer:
  def __init__(self, directory: str, max_to_keep: int = 3, save_every: int = 1000):
    self.directory = files.absolute(directory)
    self._remove_stale_temporaries()
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_every,
                                        enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=opts)

  def _remove_stale_temporaries(self) -> None:
    """A save that a crash interrupted leaves <step>.orbax-checkpoint-tmp-*: never a complete checkpoint,
    and (the workdir lock excludes a concurrent run) nobody is writing it any more."""
    if jax.process_index() == 0:
      for name in files.listdir(self.directory):
        if '.orbax-checkpoint-tmp' in name:
          logging.warning('removing %s, left by an interrupted save', files.join(self.directory, name))
          try:
            files.rmtree(files.join(self.directory, name))
          except OSError as e:
            logging.warning('could not remove it (%s)', e)
    multihost.sync('checkpoint-temporaries')

  def save(self, step: int, state, extra: dict, force: bool = False) -> bool:
    if step in self.manager.all_steps():  # Saved already (periodic save, then SIGTERM / end).
      return False
    if force or self.manager.should_save(step):
      # A save that fills the disk fails inside Orbax's threads (dozens of tracebacks, a half-written
      # temporary); refused here instead, with the checkpoints already saved intact.
      need = sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(state) if hasattr(x, 'nbytes'))
      check_space(self.directory, need // jax.process_count(), f'the checkpoint of step {step}')
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)), force=force)

  def wait(self):
    self.manager.wait_until_finished()

  def _set_aside(self, step: int, why: str) -> str:
    """Moves checkpoint `step` to <step>.<why>-<time>: kept for inspection, out of the manager's way."""
    path = files.join(self.directory, str(step))
    aside = f'{path}.{why}-{int(time.time())}'
    if jax.process_index() == 0:  # One process moves it; the others wait, then all re-read.
      files.rename(path, aside)
    multihost.sync(f'checkpoint-aside-{step}')
    self.manager.reload()
    return aside

  def restore_latest(self, abstract_state, shardings):
    """(state, extra, step) of the newest readable checkpoint, or None.

    A checkpoint left incomplete by a crash is set aside. A complete one that fails to restore is
    corrupt if an older one restores (it is then set aside with a warning and the older one used);
    if none restores, the checkpoints do not fit the current config: CheckpointMismatch, nothing moved.
    """
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    failed = []  # (step, error) of complete checkpoints that did not restore, newest first.
    for step in sorted(self.manager.all_steps(), reverse=True):
      path = files.join(self.directory, str(step))
      if not files.exists(files.join(path, '_CHECKPOINT_METADATA')) or not files.committed(path):
        aside = self._set_aside(step, 'incomplete')
        logging.warning('checkpoint %d in %s is incomplete; moved to %s, trying the previous one', step,
                        self.directory, aside)
        continue
      try:
        r = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        failed.append((step, e))
        continue
      for bad, error in failed:
        aside = self._set_aside(bad, 'corrupt')
        logging.warning('checkpoint %d in %s cannot be read (%s: %s); moved to %s and resumed from step %d '
                        'instead', bad, self.directory, type(error).__name__, str(error)[:200], aside, step)
      return r['state'], r['extra'], step
    if failed:
      step, e = failed[0]
      raise CheckpointMismatch(
          f'checkpoint {files.join(self.directory, str(step))} is complete but does not fit the state of '
          f'the current config (model, optimizer or EMA settings changed?), and no older checkpoint does: '
          f'{type(e).__name__}: {str(e)[:300]}') from e
    return None

  def restore_or_init(self, abstract_state, shardings, init):
    """(state, step): the newest readable checkpoint, else `init()` at step 0."""
    restored = self.restore_latest(abstract_state, shardings)
    if restored is None:
      return init(), 0
    state, _, step = restored
    logging.info('resumed from step %d of %s', step, self.directory)
    return state, step

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
