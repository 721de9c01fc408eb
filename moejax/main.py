"""Entry point: train a model from an ml_collections config.

  python -m moejax.main --config=configs/lm_tiny.py --workdir=/tmp/lm_tiny \\
      [--config.moe.router=topk --config.moe.num_experts=16 ...]

Every config field can be overridden on the command line. A mistake found at
start-up stops the run with one line on stderr and exit status 1: a misspelled
field (`config error: --config.moe.num_expert: config.moe has no field
num_expert; did you mean num_experts?`), a value of the wrong type or out of
range, a config file that does not load, an unknown flag, a dataset that is not
prepared (with the command that prepares it), and the trainer's RunErrors (a
workdir that cannot hold the run, a checkpoint that cannot be restored, a config
that does not match the workdir), each as `<kind> error: <message>`. --verbose
prints the traceback before that line. Rerunning the same command resumes from
the latest checkpoint in the workdir.

Multi-host: pass --distributed (or set MOEJAX_DISTRIBUTED=1) to call
jax.distributed.initialize() before anything else. On Cloud TPU and under SLURM
it finds the cluster by itself; elsewhere give --coordinator_address,
--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID). Every process runs the same command, with data.input_shards a
multiple of the process count; each reads only its own input shards, and the
global batches are those of a single process with the same data.input_shards.
On CPU the processes' collectives go through gloo (JAX's default).
"""
from __future__ import annotations

import difflib
import os
import re
import sys
import traceback
from typing import Any, NoReturn, Optional, Sequence

from absl import app, flags, logging
from ml_collections import config_dict, config_flags
from ml_collections.config_flags import config_path

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for --distributed outside TPU and SLURM.")
flags.DEFINE_integer("num_processes", None, "Processes in the job, for --distributed.")
flags.DEFINE_integer("process_id", None, "This process's index, for --distributed.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_bool("verbose", False,
                  "Print the traceback of a start-up error before its one-line message.")
flags.mark_flags_as_required(["config", "workdir"])

_OVERRIDE = re.compile(r"^-{1,2}(?:no)?config\.([^=]+)")


def exit_with_error(line: str, verbose: bool) -> NoReturn:
  """Writes `line` (made one line) to stderr and exits with status 1; with
  `verbose`, the traceback of the exception being handled first."""
  if verbose:
    traceback.print_exc()
  sys.stderr.write(one_line(line) + "\n")
  sys.stderr.flush()
  sys.exit(1)


def one_line(message: str) -> str:
  """`message` with its non-blank lines joined by '; '."""
  return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def verbose_requested(argv: Sequence[str]) -> bool:
  """Whether argv sets --verbose (read before the flags are parsed); the last wins."""
  verbose = False
  for arg in argv[1:]:
    if arg == "--":
      break
    if not arg.startswith("-"):
      continue
    name, _, value = arg.lstrip("-").partition("=")
    if name == "verbose":
      verbose = value.lower() in ("", "true", "t", "1")
    elif name == "noverbose":
      verbose = False
  return verbose


def config_argument(argv: Sequence[str]) -> Optional[str]:
  """The value of --config in argv (the last one given), or None."""
  value = None
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--":
      break
    match = re.match(r"^-{1,2}config(=|$)", arg)
    if match:
      value = arg.split("=", 1)[1] if match.group(1) else (
          argv[i + 1] if i + 1 < len(argv) else None)
  return value


def config_overrides(argv: Sequence[str]) -> list[str]:
  """The field paths of the --config.<path> overrides in argv, in order."""
  paths = []
  for arg in argv[1:]:
    if arg == "--":
      break
    match = _OVERRIDE.match(arg)
    if match:
      paths.append(match.group(1))
  return paths


def load_config(path: str) -> tuple[Any, Optional[str]]:
  """(config, None) from the config file `path` (`file.py[:arg]`), or (None, why
  it does not load)."""
  try:
    config = FLAGS["config"].parser.parse(path)
  except Exception as e:  # pylint: disable=broad-except
    cause = e.__context__ if "Error whilst parsing config file" in str(e) else e
    return None, f"{type(cause).__name__}: {one_line(cause)}"
  try:
    config.keys()
  except OSError as e:  # ml_collections defers a file that does not load to first use
    lines = [line for line in str(e.__cause__ or e).splitlines() if line.strip()]
    return None, lines[-1].strip()
  return config, None


def field_error(config, path: str) -> Optional[str]:
  """Why config has no field `path` (dotted, as after --config.), or None if it has."""
  try:
    parts = config_path.split(path)
  except ValueError:
    return f"{path!r} is not a field path"
  node, walked = config, "config"
  for part in parts:
    if isinstance(node, (config_dict.ConfigDict, dict)) and isinstance(part, str):
      if part not in node:
        keys = sorted(node.keys())
        guess = difflib.get_close_matches(part, keys, n=1)
        hint = f"did you mean {guess[0]}?" if guess else f"its fields: {', '.join(keys)}"
        return f"{walked} has no field {part}; {hint}"
      node = node[part]
    elif isinstance(part, str):
      return (f"{walked} is a value ({type(node).__name__}), not a section with "
              f"field {part}")
    else:
      try:
        node = node[part]
      except (IndexError, KeyError, TypeError):
        return f"{walked} has no item [{part!r}]"
    walked = f"{walked}[{part!r}]" if not isinstance(part, str) else f"{walked}.{part}"
  return None


def value_error(config, error: Exception) -> Optional[str]:
  """One line for absl's error on a --config.<path>=<value> override whose value
  does not parse as the field's type, or None if `error` is not one."""
  match = re.match(r"^flag --config\.([^=\s]+)=(.*?): (.*)$", str(error), re.S)
  if not match:
    return None
  path, value, reason = match.groups()
  try:
    kind = config_path.get_type(path, config)
  except Exception:  # pylint: disable=broad-except
    return f"--config.{path}: {one_line(reason)}"
  if isinstance(kind, type) and issubclass(kind, config_dict.ConfigDict):
    return (f"--config.{path}: config.{path} is a section, not a value; set its fields "
            f"(--config.{path}.<field>=...)")
  name = getattr(kind, "__name__", str(kind))
  return f"--config.{path}: config.{path} must be of type {name}, got {value!r}"


def flag_error_line(error: Exception, argv: Sequence[str]) -> str:
  """The one line for an error raised while parsing argv: the config file that
  does not load, the first override naming no field, a value of the wrong type,
  or absl's own message (unknown flag, missing required flag)."""
  path = config_argument(argv)
  if path:
    config, why = load_config(path)
    if config is None:
      return f"config error: --config={path}: {why}"
    for field in config_overrides(argv):
      problem = field_error(config, field)
      if problem:
        return f"config error: --config.{field}: {problem}"
    line = value_error(config, error)
    if line:
      return f"config error: {line}"
  if isinstance(error, flags.Error):
    return f"flag error: {error}"
  return f"flag error: {type(error).__name__}: {error}"


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flags parser for app.run: parses argv and returns the rest; a mistake
  exits with one line (and with --verbose its traceback)."""
  verbose = verbose_requested(argv)
  try:
    rest = FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    exit_with_error(flag_error_line(e, argv), verbose)
  try:
    FLAGS.config.keys()
  except OSError as e:  # the config file did not load
    exit_with_error(flag_error_line(e, argv), verbose)
  return rest


def distributed_arguments(coordinator_address, num_processes, process_id) -> dict:
  """jax.distributed.initialize keyword arguments from the flags that are set
  (unset ones are left to JAX's cluster detection and JAX_* environment)."""
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  if num_processes is not None and num_processes < 1:
    raise app.UsageError(f"--num_processes must be >= 1, got {num_processes}")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise app.UsageError(f"--process_id must be in [0, {num_processes}), got {process_id}")
  return {k: v for k, v in given.items() if v is not None}


def check_config(config) -> None:
  """setup.check, its ValueError raised as a ConfigError."""
  from moejax.train import errors, setup  # pylint: disable=g-import-not-at-top
  try:
    setup.check(config)
  except errors.RunError:
    raise
  except ValueError as e:
    raise errors.ConfigError(str(e)) from e


def run(config, workdir: str, progress: bool = True, verbose: bool = False) -> None:
  """Checks the config and trains it in `workdir`. A RunError (a bad config
  value among them) or a dataset that is not prepared exits with one line,
  `<kind> error: <message>`, and status 1."""
  from moejax.data import DatasetNotReady  # pylint: disable=g-import-not-at-top
  from moejax.train import errors, train  # pylint: disable=g-import-not-at-top
  try:
    check_config(config)
    train(config, workdir, progress=progress)
  except errors.RunError as e:
    exit_with_error(f"{e.kind} error: {e}", verbose)
  except DatasetNotReady as e:
    exit_with_error(f"data error: {e}", verbose)


def main(argv) -> None:
  """Joins the distributed job if asked, then `run`s --config in --workdir."""
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.distributed or os.environ.get("MOEJAX_DISTRIBUTED") == "1":
    try:
      arguments = distributed_arguments(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)
    except app.UsageError as e:
      exit_with_error(f"flag error: {e}", FLAGS.verbose)
    jax.distributed.initialize(**arguments)
  run(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress, verbose=FLAGS.verbose)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
