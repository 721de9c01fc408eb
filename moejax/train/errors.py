"""The failures a user can act on: `python -m moejax.main` reports them in one line.

Raise RunError (or a subclass) with a message that names what is wrong (the config
field, the checkpoint step, the path) and what to do; the entry point prints
`<kind> error: <message>` and exits with status 1, without a traceback unless
--verbose is given.
"""
from __future__ import annotations


class RunError(Exception):
  """A failure to report in one line; `kind` prefixes the message."""

  kind = "run"


class ConfigError(RunError, ValueError):
  """A config field that is wrong or does not fit the workdir."""

  kind = "config"


class WorkdirError(RunError):
  """A workdir that cannot hold the run (a file, not writable, full disk)."""

  kind = "workdir"


class CheckpointError(RunError):
  """No checkpoint in the workdir can be restored."""

  kind = "checkpoint"
