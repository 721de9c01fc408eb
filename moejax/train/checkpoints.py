"""Orbax checkpoints of the train state and the data position, with resume.

One orbax CheckpointManager per workdir (`<workdir>/checkpoints`, keep N). Each
checkpoint holds `state` (step, params, optimizer state, `routing` collection)
and `data`, the position of every input shard (see moejax.data.pipeline): one
file `shard_<s>-of-<S>.json` per shard with its grain iterator state, written by
the process that reads the shard. A run with any process count that divides S
restores them, so a checkpoint written by n processes resumes on m, with the same
parameters and the same next batch.

Saves are synchronous and atomic: orbax 0.12.8 writes a step into
`<step>.orbax-checkpoint-tmp` and renames it to `<step>` when complete, so a
process killed mid-save leaves the previous checkpoint as the latest. Orbax does
not remove such a leftover at start-up (cleanup_tmp_directories is off), its step
listing (latest_step) ignores it, and the next save of that step replaces it.

Resume (`restore_latest`) takes the newest checkpoint that restores. For each,
newest first: its stored shapes are compared with the new state's and its data
position with the input shards, and a difference stops the run (ConfigError,
nothing is moved: a config change is not damage); then the checkpoint is
restored, and a failure there makes it unreadable. Unreadable checkpoints newer
than the one used are moved to `<workdir>/checkpoints_unreadable/<step>`
(outside orbax's listing, never deleted); when none restores, the run stops with
CheckpointError and nothing is moved.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from moejax.train.abandoned_reads import silence_abandoned_reads
from moejax.train.errors import CheckpointError, ConfigError, RunError

UNREADABLE_DIR = "checkpoints_unreadable"
TMP_SUFFIX = ".orbax-checkpoint-tmp"
SHARD_FILE = re.compile(r"shard_(\d+)-of-(\d+)\.json$")


def shard_file(shard: int, num_shards: int) -> str:
  return f"shard_{shard:05d}-of-{num_shards:05d}.json"


class InputShardsHandler(ocp.CheckpointHandler):
  """Orbax handler of a ShardedIterator's position: one JSON file per input shard."""

  def save(self, directory: epath.Path, args: "InputShardsSave") -> None:
    iterator = args.iterator
    for shard, state in iterator.get_state().items():
      (directory / shard_file(shard, iterator.num_shards)).write_text(json.dumps(state))

  def restore(self, directory: epath.Path, args: "InputShardsRestore") -> Any:
    iterator = args.iterator
    states = {}
    for shard in iterator.shards:
      path = directory / shard_file(shard, iterator.num_shards)
      if not path.exists():
        saved = sorted(p.name for p in directory.iterdir())
        raise ValueError(f"data.input_shards: checkpoint {directory} has no position for "
                         f"input shard {shard} of {iterator.num_shards} (it holds {saved})")
      states[shard] = json.loads(path.read_text())
    iterator.set_state(states)
    return iterator


@ocp.args.register_with_handler(InputShardsHandler, for_save=True)
@dataclasses.dataclass
class InputShardsSave(ocp.args.CheckpointArgs):
  iterator: Any


@ocp.args.register_with_handler(InputShardsHandler, for_restore=True)
@dataclasses.dataclass
class InputShardsRestore(ocp.args.CheckpointArgs):
  iterator: Any


@dataclasses.dataclass
class Unreadable:
  """A checkpoint that did not restore: its step, why, and where it was moved."""

  step: int
  reason: str
  moved_to: Optional[str] = None


@dataclasses.dataclass
class Resume:
  """What restore_latest found: the step restored (0: none) and its state, the
  unreadable checkpoints moved aside, and unfinished saves left by a killed run."""

  step: int = 0
  state: Any = None
  unreadable: list = dataclasses.field(default_factory=list)
  unfinished: list = dataclasses.field(default_factory=list)

  def warnings(self, directory: str) -> list[str]:
    """One line per unfinished save and per checkpoint moved aside."""
    lines = [f"warning: {os.path.join(directory, name)} is a save that did not finish "
             "(the run stopped while saving); it is ignored, and replaced when its step "
             "is saved again" for name in self.unfinished]
    lines += [f"warning: checkpoint {u.step} in {directory} cannot be read ({u.reason}); "
              f"moved to {u.moved_to}; resuming from checkpoint {self.step}"
              for u in self.unreadable]
    return lines


class Checkpointer:
  """Saves and restores (state, data position) under <workdir>/checkpoints."""

  def __init__(self, workdir: str, keep: int):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, iterator: Any) -> None:
    """Saves `state` and the position of the ShardedIterator `iterator`. A disk that
    is full raises CheckpointError (the previous checkpoint stays the latest)."""
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=InputShardsSave(iterator)), force=True)
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if not _disk_full(e):
        raise
      latest = self.latest_step()
      kept = (f"checkpoint {latest} is intact and stays the latest" if latest
              else "no earlier checkpoint exists")
      raise CheckpointError(
          f"checkpoint {step} could not be written to {self.directory}: the disk is full "
          f"({_disk_full(e)}); {kept}; free space and rerun the same command") from e

  def restore(self, step: int, abstract_state: Any, iterator: Any = None) -> Any:
    """The state saved at `step` (shaped and sharded like abstract_state). A given
    iterator is moved to the saved position of its shards in place; without one
    the state alone is read (analysis of a run)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
      items["data"] = InputShardsRestore(iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def restore_latest(self, abstract_state: Any, iterator: Any) -> Resume:
    """Restores the newest checkpoint that can be read (see the module docstring).

    Raises ConfigError when a checkpoint does not fit the state or the input
    shards, CheckpointError when checkpoints exist and none can be read."""
    resume = Resume(unfinished=unfinished_saves(self.directory))
    steps = sorted(self.manager.all_steps(), reverse=True)
    if steps:
      silence_abandoned_reads()
    failed = []
    for step in steps:
      state, reason = None, None
      try:
        self.check_fits(step, abstract_state, iterator)
        state = self.restore(step, abstract_state, iterator)
      except RunError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        reason = unreadable_reason(self.step_directory(step), e)
      if _all_processes(reason is None):
        resume.step, resume.state = step, state
        resume.unreadable = [Unreadable(s, r, self.move_aside(s)) for s, r in failed]
        return resume
      failed.append((step, reason or "it cannot be read on another process"))
    if failed:
      listed = "; ".join(f"step {s}: {r}" for s, r in failed)
      raise CheckpointError(
          f"no checkpoint in {self.directory} can be restored ({listed}); nothing was "
          f"moved; to train from step 0, move them out of {self.directory}, or use a new "
          "workdir")
    return resume

  def step_directory(self, step: int) -> str:
    """Where orbax keeps checkpoint `step` (its default step names)."""
    return os.path.join(self.directory, str(step))

  def check_fits(self, step: int, abstract_state: Any, iterator: Any) -> None:
    """Raises ConfigError when checkpoint `step` holds other shapes than
    abstract_state or the positions of another number of input shards; errors
    reading its metadata propagate (the checkpoint is then unreadable)."""
    directory = self.step_directory(step)
    handler = ocp.StandardCheckpointHandler()
    saved = flat_shapes(handler.metadata(epath.Path(directory) / "state"))
    differences = shape_differences(saved, flat_shapes(abstract_state))
    if differences:
      shown = "; ".join(differences[:3])
      more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
      raise ConfigError(
          f"checkpoint {step} in {self.directory} does not fit the config's model: {shown}"
          f"{more}; the config differs from the one that wrote it: use a new workdir, "
          "or that config")
    counts = saved_shard_counts(os.path.join(directory, "data"))
    if counts and iterator.num_shards not in counts:
      raise ConfigError(
          f"checkpoint {step} in {self.directory} holds the data position of "
          f"data.input_shards={sorted(counts)[0]}, but the config has data.input_shards="
          f"{iterator.num_shards}; use the same data.input_shards, or a new workdir")

  def move_aside(self, step: int) -> str:
    """Moves checkpoint `step` to <workdir>/checkpoints_unreadable/<step> (a new
    name if that exists) on process 0; returns where it went."""
    target_dir = os.path.join(self.workdir, UNREADABLE_DIR)
    target = os.path.join(target_dir, str(step))
    suffix = 1
    while os.path.exists(target):
      target = os.path.join(target_dir, f"{step}.{suffix}")
      suffix += 1
    if jax.process_index() == 0:
      try:
        os.makedirs(target_dir, exist_ok=True)
        os.rename(self.step_directory(step), target)
      except OSError as e:
        raise CheckpointError(f"checkpoint {step} in {self.directory} cannot be read and "
                              f"cannot be moved to {target} ({e.strerror or e}); move it "
                              "away by hand") from None
    _barrier(f"moejax_move_aside_{step}")
    self.manager.reload()
    return target

  def close(self) -> None:
    self.manager.close()


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs with the shardings of `state`, for restoring into it."""
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def _disk_full(error: BaseException) -> Optional[str]:
  """The message of the no-space error in `error`'s chain (an OSError with ENOSPC,
  or TensorStore's text of one), else None."""
  seen = 0
  while error is not None and seen < 20:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return error.strerror or "No space left on device"
    if "No space left on device" in str(error):
      return "No space left on device"
    error, seen = error.__cause__ or error.__context__, seen + 1
  return None


def saved_steps(directory: str) -> list[int]:
  """The steps of the finished checkpoints in `directory` (orbax's step names)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def unfinished_saves(directory: str) -> list[str]:
  """Names of orbax temporary step directories: saves that did not finish."""
  if not os.path.isdir(directory):
    return []
  return sorted(name for name in os.listdir(directory) if TMP_SUFFIX in name)


def saved_shard_counts(directory: str) -> set[int]:
  """The shard counts S of the `shard_<s>-of-<S>.json` files in a data item."""
  if not os.path.isdir(directory):
    return set()
  return {int(m.group(2)) for m in map(SHARD_FILE.match, os.listdir(directory)) if m}


def _key_name(key: Any) -> str:
  """The name of a pytree path entry (dict key, attribute, sequence index)."""
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{path: (shape, dtype name)} of the array leaves of a state, an abstract state
  or orbax's metadata tree; paths join key names with '/' (params/block_0/...)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_name(k) for k in path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
          for path, leaf in leaves if hasattr(leaf, "shape")}


def shape_differences(saved: dict, wanted: dict) -> list[str]:
  """Per differing path: what the checkpoint holds and what the state needs."""
  def describe(entry):
    return "absent" if entry is None else f"{entry[0]} {entry[1]}"
  def order(path):   # parameters first, then the routing collection, then the rest
    return ({"params": 0, "routing": 1}.get(path.split("/", 1)[0], 2), path)
  return [f"{path} saved {describe(saved.get(path))}, now {describe(wanted.get(path))}"
          for path in sorted(set(saved) | set(wanted), key=order)
          if saved.get(path) != wanted.get(path)]


def unreadable_reason(directory: str, error: BaseException) -> str:
  """Why the checkpoint in `directory` did not restore, in a few words: a missing
  part, an empty or invalid metadata file, else the innermost read error."""
  reason = damaged_part(directory) or _error_reason(directory, error)
  return " ".join(reason.split())[:300]


def damaged_part(directory: str) -> Optional[str]:
  """The first missing part, empty file or unparsable JSON file of a checkpoint."""
  for part in ("state", "data", os.path.join("state", "_METADATA")):
    if not os.path.exists(os.path.join(directory, part)):
      return f"{part} is missing"
  for root, _, files in sorted(os.walk(directory)):
    for name in sorted(files):
      path = os.path.join(root, name)
      relative = os.path.relpath(path, directory)
      if os.path.getsize(path) == 0:
        return f"{relative} is empty"
      if _is_json(name, root):
        try:
          with open(path, encoding="utf-8") as f:
            json.load(f)
        except ValueError as e:
          return f"{relative} is not valid JSON ({e})"
  return None


def _is_json(name: str, root: str) -> bool:
  """Whether a checkpoint file holds JSON (orbax's metadata files, shard positions)."""
  return (name.endswith(".json") or name in ("_METADATA", "_CHECKPOINT_METADATA", "_sharding")
          or os.path.basename(root) == "array_metadatas")


def _error_reason(directory: str, error: BaseException) -> str:
  """The innermost informative message of an error chain, shortened: for a
  TensorStore read error, the file, what went wrong and the array read."""
  chain, seen = [], error
  while seen is not None and len(chain) < 20:
    if not isinstance(seen, StopIteration):
      chain.append(seen)
    seen = seen.__cause__ or seen.__context__
  for e in reversed(chain):
    text = str(e).split(" [tensorstore_spec", 1)[0].strip()
    if re.match(r"^[A-Z_]+: ", text):
      files = re.findall(r'local file "([^"]+)"', text)
      array = re.search(r'Error reading "([^"/]+)', text)
      where = os.path.relpath(files[-1], directory) if files else "state"
      detail = text.rsplit(": ", 1)[-1].replace(directory.rstrip(os.sep) + os.sep, "")
      return f"{where}: {detail}" + (f" (reading {array.group(1)})" if array else "")
  first = str(chain[0] if chain else error).strip().splitlines()
  return f"{type(error).__name__}: {first[0] if first else ''}"[:300]


def _all_processes(ok: bool) -> bool:
  """`ok` on every process (an all-gather in multi-process runs)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _barrier(name: str) -> None:
  """Waits for every process (multi-process runs only)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
