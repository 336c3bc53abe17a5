"""A stop while a command's libraries load: the first seconds of `python -m srdd_jax.main` (or .scaling), when
Python imports JAX and the rest and nothing has been written yet.

Standard library only, so that a command's module installs it before its other imports: SIGTERM or Ctrl-C
then ends the process at once with the status of every stop (75) and one line, not a traceback (Ctrl-C's
KeyboardInterrupt) or a kill by the signal (143). Once the libraries are loaded, the command replaces it with
the handler of the run (preemption.stop_on_signals).
"""
import os
import signal

# The exit status of every stop by SIGTERM or Ctrl-C: the work done is kept, nothing half-written is used,
# the same command continues it (the training driver's PREEMPTED_EXIT_CODE is the same number).
STOPPED_EXIT_CODE = 75


def _stop(signum, frame):
  del frame
  os.write(2, f'stopped by {signal.Signals(signum).name} while starting; nothing was written: run the same '
              'command again\n'.encode())
  os._exit(STOPPED_EXIT_CODE)  # pylint: disable=protected-access


def install() -> None:
  for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, _stop)
