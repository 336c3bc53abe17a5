"""Orbax checkpoints of the train state: async saves, keep the last N, restore into a sharded
abstract state (so a run can resume on another mesh), and skip a checkpoint that cannot be read."""
from __future__ import annotations

import os
import time

import jax
import orbax.checkpoint as ocp
from absl import logging

from srdd_jax.config import ConfigError
from srdd_jax.parallel import multihost


class CheckpointMismatch(ConfigError):
  """A complete checkpoint whose contents do not fit the configured train state."""


class Checkpointer:
  def __init__(self, directory: str, max_to_keep: int = 3, save_every: int = 1000):
    self.directory = os.path.abspath(directory)
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_every,
                                        enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=opts)

  def save(self, step: int, state, extra: dict, force: bool = False) -> bool:
    if step in self.manager.all_steps():  # Saved already (periodic save, then SIGTERM / end).
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)), force=force)

  def wait(self):
    self.manager.wait_until_finished()

  def restore_latest(self, abstract_state, shardings):
    """(state, extra, step) of the newest readable checkpoint, or None. A checkpoint that fails to
    restore (left incomplete by a crash, say) is skipped with a warning and left on disk."""
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    for step in sorted(self.manager.all_steps(), reverse=True):
      path = os.path.join(self.directory, str(step))
      if not os.path.exists(os.path.join(path, '_CHECKPOINT_METADATA')):
        # Left incomplete (a crash mid-save): moved aside, not deleted, so its step can be saved again.
        aside = f'{path}.incomplete-{int(time.time())}'
        if jax.process_index() == 0:  # One process moves it; the others wait, then all re-read.
          os.replace(path, aside)
        multihost.sync(f'checkpoint-aside-{step}')
        logging.warning('checkpoint %d in %s is incomplete; moved to %s, trying the previous one', step,
                        self.directory, aside)
        self.manager.reload()
        continue
      try:
        r = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        raise CheckpointMismatch(
            f'checkpoint {path} is complete but does not fit the state of the current config (model, '
            f'optimizer or EMA settings changed?): {type(e).__name__}: {str(e)[:300]}') from e
      return r['state'], r['extra'], step
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
