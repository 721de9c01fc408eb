"""Preemption: stop at a step boundary with a checkpoint when the job is told to.

TPU pods and cloud GPUs are preempted with SIGTERM and a grace period before
SIGKILL. The trainer asks `PreemptionWatch.reached(step)` at every step
boundary; once it is true, it saves a checkpoint at that step (unless one is
there already), prints one line and raises `Preempted`, which ends the process
with exit status 75 (EX_TEMPFAIL in sysexits.h: a temporary failure, try again).
Rerunning the same command continues from the checkpoint. A non-zero status
keeps a scheduler from taking the stop for the run's completion (a Kubernetes
Job would, on 0); to retry it, match on 75.

How a process learns of the signal:

* One process: a Python SIGTERM handler sets a flag; the previous handler is
  restored when the watch ends. It is installed only from the main thread
  (Python allows no other); elsewhere SIGTERM keeps its previous handler. The
  trainer installs it just before the training loop: a signal earlier in
  start-up (data, model, restore) ends the process at once, with nothing
  trained since the checkpoint to lose.
* JAX distributed runs (`jax.distributed.initialize`, any process count): the
  JAX preemption service, `orbax.checkpoint.multihost.reached_preemption(step)`
  (it wraps `jax.experimental.multihost_utils.reached_preemption_sync_point`
  and is False when the service is off). Every process asks it at every step;
  once any of them has been signalled, all agree on one step, the one after
  the largest any has reached when the notice has gone round, and stop there
  together. A signal during start-up waits for the first steps.

What jax.distributed.initialize sets up (JAX 0.10, also on CPU): with
`jax_enable_preemption_service` (the default) a preemption sync manager whose
notifier installs a C-level SIGTERM handler (`preemption_notifier.cc`, which
logs "SIGTERM caught"). Measured on CPU with 1 and 2 processes calling the sync
point every 10 to 50 ms: all reached it at the same step, about a second after
the signal. Python's `signal.getsignal(SIGTERM)` still reports SIG_DFL, since
it knows only handlers set from Python. A Python handler of our own replaces
JAX's at the C level (measured: installed after initialize, it gets the signal,
the notifier never does, and the sync point never comes), so the process that
got the signal would stop alone while the others train on; restoring "the
previous" handler would then restore SIG_DFL, not JAX's. So where the service
runs, SIGTERM is left to JAX. A multi-process run with the service disabled has
no preemption handling: SIGTERM keeps its default action and ends the process
it reaches.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

import jax

EXIT_STATUS = 75


class Preempted(SystemExit):
  """The run stopped for a preemption after saving its state at `step`; as an
  uncaught exception it ends the process with EXIT_STATUS, without a traceback."""

  def __init__(self, step: int):
    super().__init__(EXIT_STATUS)
    self.step = step


def uses_preemption_service() -> bool:
  """Whether JAX's preemption service runs (and handles SIGTERM) in this process."""
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class PreemptionWatch:
  """Context manager: `reached(step)` is true at the step where training must stop.

  Call `reached` at every step boundary, with increasing steps, on every process.
  """

  def __init__(self):
    self._requested = False
    self._service = False
    self._previous = None
    self._installed = False

  def __enter__(self) -> "PreemptionWatch":
    self._service = uses_preemption_service()
    if (not self._service and jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def __exit__(self, *exc_info) -> None:
    if self._installed:
      # None: the previous handler was not set from Python; SIG_DFL is the
      # closest Python can restore.
      signal.signal(signal.SIGTERM,
                    signal.SIG_DFL if self._previous is None else self._previous)
      self._installed = False

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self._requested = True

  def reached(self, step: int) -> bool:
    """True once the job has been told to stop: at the next boundary (one
    process) or at the step all processes agreed on (the JAX service)."""
    if self._service:
      import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
      return bool(ocp.multihost.reached_preemption(step))
    return self._requested


def stop_message(step: int, saved: Optional[str]) -> str:
  """The one line printed when a preempted run stops at `step`; `saved`: the
  checkpoint directory holding that step, None when nothing has been trained."""
  if saved is None:
    return (f"preempted before the first step: nothing to save; rerunning the same "
            f"command starts the run (exit status {EXIT_STATUS})")
  return (f"preempted: stopped at step {step} with its checkpoint in {saved}; rerunning "
          f"the same command continues from there (exit status {EXIT_STATUS})")
