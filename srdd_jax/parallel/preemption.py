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
Python's signal module cannot give it back): a command keeps the C++ handler's `sigaction` when
jax.distributed has started (`keep_jax_sigterm`) and puts it back while the driver trains
(`sigterm_to_jax`); there a Ctrl-C becomes a SIGTERM of its own process. Outside training, Python's
handler stops the process where it is, as with one process. Steps are absolute training steps, as Orbax's
`CheckpointManager.should_save` asks them too; see `reached` for the one notice that can be missed.

Outside a training loop (setup, compilation, tokenizing, sampling, evaluation, a study's or a sweep's
bookkeeping), a command's process stops by `stop_on_signals`: the signal raises Interrupted in the main
thread, which unwinds (the workdir lock released, nothing half-written put in place) to an exit with the
status the driver's loop gives, 75; a watchdog ends the process with that status if the main thread is
held in native code longer than GRACE_SECONDS.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import sys
import threading
import time

import jax
from jax.experimental import multihost_utils

from srdd_jax.config import ConfigError
from srdd_jax.parallel.early_stop import STOPPED_EXIT_CODE


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
  return callable(signal.getsignal(signal.SIGTERM)) and not _NATIVE['jax_owns']


# --- SIGTERM between JAX's notifier (training) and Python (everywhere else) ------------------------------

# JAX's notifier handles SIGTERM in C++; Python's signal module cannot hand such a handler back once its own
# replaced it (nor see it: getsignal reports what Python last set, SIG_DFL). The C library's sigaction can:
# the notifier's `struct sigaction`, read right after jax.distributed started, is put back while several
# processes train, and Python's handler reinstalled after. 256 bytes hold the structure on every Linux
# (152 on x86-64 and arm64).
_SIGACTION_BYTES = 256
_NATIVE = {'sigterm': None, 'jax_owns': False}


def _sigaction(signum: int, new=None) -> bytes:
  libc = ctypes.CDLL(None, use_errno=True)
  old = ctypes.create_string_buffer(_SIGACTION_BYTES)
  if libc.sigaction(ctypes.c_int(int(signum)), new, old) != 0:
    err = ctypes.get_errno()
    raise OSError(err, f'sigaction({int(signum)}): {os.strerror(err)}')
  return old.raw


def keep_jax_sigterm() -> None:
  """Call right after jax.distributed has started (its notifier then handles SIGTERM): keeps that handler,
  so that `sigterm_to_jax` can give SIGTERM back to it after `stop_on_signals` installed Python's."""
  if callable(signal.getsignal(signal.SIGTERM)):
    return  # Python's own (a process that calls main.run keeps its handlers): the notifier never had it.
  action = _sigaction(signal.SIGTERM)
  # The structure opens with the handler; SIG_DFL (0) or SIG_IGN (1) there: the notifier installed none.
  if int.from_bytes(action[:ctypes.sizeof(ctypes.c_void_p)], sys.byteorder) not in (0, 1):
    _NATIVE['sigterm'] = action


def jax_sigterm_kept() -> bool:
  return _NATIVE['sigterm'] is not None


@contextlib.contextmanager
def sigterm_to_jax():
  """While several processes train (the driver's run): SIGTERM goes to JAX's notifier, so that all of them
  stop at one agreed step and save together; before and after, this process's Python handler stops it
  where it is (setup, compilation, sampling, evaluation: exit 75, nothing to agree on). A no-op for one
  process, or where the notifier's handler was not kept."""
  saved = _NATIVE['sigterm']
  if saved is None or not coordinated() or _NATIVE['jax_owns']:
    yield
    return
  python = signal.getsignal(signal.SIGTERM)
  _sigaction(signal.SIGTERM, ctypes.create_string_buffer(saved, _SIGACTION_BYTES))
  _NATIVE['jax_owns'] = True
  try:
    yield
  finally:
    _NATIVE['jax_owns'] = False
    if python is not None:
      signal.signal(signal.SIGTERM, python)


# --- stops outside a training loop ---------------------------------------------------------------------

# A second Ctrl-C in a training loop: the run ends at once, without the stop's checkpoint.
ABORTED_EXIT_CODE = 130
# How long the main thread has to act on a stop before the process exits without it: a thread cannot be
# interrupted inside native code (XLA compiling, a wait for the device), and a scheduler's grace period
# after SIGTERM, before its SIGKILL, is typically 30 s.
GRACE_SECONDS = float(os.environ.get('SRDD_STOP_GRACE_SECONDS', 10))


class Interrupted(BaseException):
  """SIGTERM or Ctrl-C outside a training loop (setup, compilation, tokenizing, sampling, evaluation), raised
  in the main thread where it was, so that every `with` and `finally` on the way up runs (the workdir lock
  is released; an output being written stays in its `.partial` folder or temporary file, which the next
  run removes), and the command exits with STOPPED_EXIT_CODE. A BaseException, as KeyboardInterrupt is:
  the `except Exception` of error handling on the way never takes it for a failure to report. Also raised
  by a runner whose training stage the driver stopped (its checkpoint saved), to end the command alike."""

  def __init__(self, signal_name: str, where: str = ''):
    super().__init__(signal_name, where)
    self.signal_name, self.where = signal_name, where

  def __str__(self):
    return f'stopped by {self.signal_name}' + (f' ({self.where})' if self.where else '')


class _Stops:
  """The process's handler of SIGTERM and SIGINT while a command runs, and its watchdog."""

  def __init__(self):
    self.signal = None  # The first stop's signal name.
    self.in_flight = False  # An Interrupted is on its way up the main thread.
    self.cleanups = []  # What the watchdog runs before it ends the process (the lock's release).
    self.watching = False

  def handler(self, signum, frame):
    del frame
    if self.in_flight:  # Already stopping: a second signal must not cut the unwinding (a lock's release).
      return
    self.signal = self.signal or signal.Signals(signum).name
    self.in_flight = True
    raise Interrupted(self.signal)

  def unraisable(self, previous, unraisable):
    """sys.unraisablehook: an Interrupted raised where no exception can propagate (the handler ran inside a
    garbage-collection callback, such as JAX's, or a __del__) is lost there, and the run went on to exit 0.
    The stop is sent again a moment later (from a thread: raised here, or at once, it would be lost again),
    and the main thread raises it in the code it runs then."""
    if isinstance(unraisable.exc_value, Interrupted):
      self.in_flight = False
      threading.Timer(0.05, os.kill, (os.getpid(), signal.Signals[self.signal])).start()
      return
    previous(unraisable)

  def watch(self, read_fd: int) -> None:
    """Woken by every signal (signal.set_wakeup_fd): when it is one this handler owns and the process is
    still there GRACE_SECONDS later (the main thread held in native code), ends it with the stop's status."""
    while True:
      try:
        data = os.read(read_fd, 16)
      except OSError:
        return
      if not data:
        return
      if not any(signal.getsignal(s) == self.handler for s in data if s in (signal.SIGTERM, signal.SIGINT)):
        continue  # The training loop's own handler has it: it stops after the step and saves.
      time.sleep(GRACE_SECONDS)
      name = self.signal or signal.Signals(data[0]).name
      os.write(2, (f'stopped by {name}: the main thread did not leave native code (compilation, a device '
                   f'wait) within {GRACE_SECONDS:g} s, so the process ends now; nothing half-written is used: run '
                   'the same command again\n').encode())
      for fn in list(self.cleanups):
        try:
          fn()
        except Exception:  # pylint: disable=broad-except
          pass
      os._exit(STOPPED_EXIT_CODE)  # pylint: disable=protected-access


_STOPS = _Stops()


def stop_on_signals(sigterm: bool = True) -> None:
  """From now on SIGINT (and SIGTERM, with `sigterm`) outside a training loop raises Interrupted in the main
  thread; the driver's loop installs its own handler for its steps and puts this one back after. Call from
  the main thread of a command's process (never from a library: a test process keeps its own handlers).
  `sigterm` False: after jax.distributed has started, whose preemption notifier owns SIGTERM (a Python
  handler would replace it)."""
  signal.signal(signal.SIGINT, _STOPS.handler)
  if sigterm:
    signal.signal(signal.SIGTERM, _STOPS.handler)
  if not _STOPS.watching:
    sys.unraisablehook = functools.partial(_STOPS.unraisable, sys.unraisablehook)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_STOPS.watch, args=(read_fd,), name='srdd-stop-watchdog', daemon=True).start()
    _STOPS.watching = True


def default_sigterm() -> None:
  """SIGTERM back to its default, before jax.distributed starts: its notifier then installs its own handler,
  which a Python one installed earlier would leave confused about who owns the signal."""
  if callable(signal.getsignal(signal.SIGTERM)):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def at_forced_exit(fn) -> None:
  """`fn()` runs (from the watchdog's thread) before the watchdog ends a process that did not stop in
  time: what must not outlive it, such as the workdir's lock file."""
  _STOPS.cleanups.append(fn)


def stopping() -> str | None:
  """The signal a stop was asked for by (SIGTERM, SIGINT), None before any."""
  return _STOPS.signal


def stopping_handled() -> bool:
  """Whether this process stops by `stop_on_signals` (a command's process; not a test's)."""
  return _STOPS.watching


def exit_of(e: BaseException) -> tuple[int, str]:
  """(exit status, the one line to print) of a command that ended by Interrupted (a stop outside a training
  loop) or KeyboardInterrupt (the second Ctrl-C the driver's loop turns into one)."""
  if isinstance(e, KeyboardInterrupt):
    return ABORTED_EXIT_CODE, ('aborted by a second Ctrl-C: the stop\'s checkpoint was not saved; the run resumes '
                               'from the one before it when the same command is run again')
  return STOPPED_EXIT_CODE, (f'{e}: the work completed before it is kept, nothing half-written is used (outputs '
                             'are put in place whole); run the same command again to continue')
