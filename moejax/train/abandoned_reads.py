"""Quiet the reads a failed orbax restore leaves behind.

When a restore fails (a damaged checkpoint), orbax stops waiting for its other
TensorStore reads and closes its event loop; as those reads finish, Python reports
each of them (`RuntimeError: Event loop is closed`, exceptions of orbax's read
coroutines, asyncio's "exception was never retrieved"): hundreds of traceback
lines after the failure has been handled and reported in one line.
silence_abandoned_reads() drops those reports, and only those: an unraisable
exception or asyncio log record whose traceback passes through orbax.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional


def silence_abandoned_reads() -> None:
  """Installs, once per process, an unraisable-exception hook and an asyncio log
  filter that drop the reports of abandoned orbax reads (module docstring)."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_abandoned_reads", False):
    return

  def hook(unraisable):
    if not _abandoned_read(unraisable.exc_value, unraisable.object):
      previous(unraisable)

  hook.drops_abandoned_reads = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_AbandonedReadFilter())


def _orbax_frames(error: Optional[BaseException]) -> bool:
  """Whether the traceback of `error` or of its causes passes through orbax."""
  marker = f"{os.sep}orbax{os.sep}checkpoint{os.sep}"
  seen = 0
  while error is not None and seen < 20:
    tb = error.__traceback__
    while tb is not None:
      if marker in tb.tb_frame.f_code.co_filename:
        return True
      tb = tb.tb_next
    error, seen = error.__cause__ or error.__context__, seen + 1
  return False


def _abandoned_read(error: Optional[BaseException], origin: Any) -> bool:
  """Whether an unraisable report comes from a read a failed restore abandoned."""
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    tb = error.__traceback__
    while tb is not None:
      if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
        return True
      tb = tb.tb_next
  code = getattr(origin, "cr_code", None)
  if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
    return True
  return _orbax_frames(error)


class _AbandonedReadFilter(logging.Filter):
  """Drops asyncio's reports of orbax futures whose exception nobody awaited."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "exception was never retrieved" not in str(record.msg):
      return True
    error = record.exc_info[1] if record.exc_info else None
    return not (_orbax_frames(error) or f"{os.sep}orbax{os.sep}" in record.getMessage())
