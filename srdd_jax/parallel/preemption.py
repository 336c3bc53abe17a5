"""One stop for every process: SIGTERM (or Ctrl-C) to any host of a multi-process run stops all of them
at the same step, where they save one checkpoint together.

Once `jax.distributed` is up, JAX's preemption notifier owns SIGTERM: a C++ handler that tells the
coordination service, after which every host's sync manager (in the background, in C++) agrees on a
step, the furthest host's next one. `reached(step)`, asked after every step, is then true on all hosts
at that same step and false everywhere else. Asking costs a lock in this process, no message and no
wait for the device, so the host keeps running ahead of the accelerator; the only exchange, a few
round trips to the coordinator, happens once, after a notice, while each host is held at its next
question.

A Python SIGTERM handler installed after `jax.distributed.initialize` replaces the C++ one (and
"restoring" the default afterwards removes it): multi-process runs leave SIGTERM alone and turn a
Ctrl-C into a SIGTERM of their own process. Steps are absolute training steps, as Orbax's
`CheckpointManager.should_save` asks them too; see `reached` for the one notice that can be missed.
"""
from __future__ import annotations

import os
import signal

import jax
from jax.experimental import multihost_utils

from srdd_jax.config import ConfigError


def coordinated() -> bool:
  """Whether a stop must be agreed with other processes (a single process stops on its own)."""
  return jax.process_count() > 1


def reached(step: int) -> bool:
  """True on every process at the step all of them stop at, once any was sent SIGTERM; else False.

  Every process must ask for the same steps in the same order (the driver asks for the newest
  checkpoint's step before restoring it, the step it resumed from, then each step it trained). The
  notice names the step after the furthest process's last question: one that came before a run's first
  question (while the process set up its data and model, or an earlier run in the same process held
  the counter elsewhere) can name a step this run never asks for. That run then trains on until the
  scheduler kills it, losing what it trained since its restore.
  """
  if not coordinated():
    return False
  try:
    return bool(multihost_utils.reached_preemption_sync_point(step))
  except RuntimeError as e:  # The service is off (jax_enable_preemption_service=False).
    raise ConfigError(f'{jax.process_count()} processes cannot agree on a stop without JAX\'s preemption service '
                      f'({e}); leave jax_enable_preemption_service on') from None


def notify() -> None:
  """Starts the stop of all processes as a SIGTERM to this one does (the C++ handler takes it)."""
  os.kill(os.getpid(), signal.SIGTERM)


def python_owns_sigterm() -> bool:
  """Whether Python code has installed a SIGTERM handler, which keeps JAX's notifier from hearing it."""
  return callable(signal.getsignal(signal.SIGTERM))
