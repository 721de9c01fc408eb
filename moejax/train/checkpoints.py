"""Orbax checkpoints of the train state and the data position, with resume.

One orbax CheckpointManager per workdir (`<workdir>/checkpoints`, keep N). Each
checkpoint holds `state` (step, params, optimizer state, `routing` collection)
and `data`, the position of every input shard (see moejax.data.pipeline): one
file `shard_<s>-of-<S>.json` per shard with its grain iterator state, written by
the process that reads the shard. A run with any process count that divides S
restores them, so a checkpoint written by n processes resumes on m, with the same
parameters and the same next batch. Saves are synchronous: a process killed
mid-save leaves the previous checkpoints intact (orbax finalises a save by
renaming its directory).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath


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


class Checkpointer:
  """Saves and restores (state, data position) under <workdir>/checkpoints."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, iterator: Any) -> None:
    """Saves `state` and the position of the ShardedIterator `iterator`."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=InputShardsSave(iterator)), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any, iterator: Any) -> Any:
    """The state saved at `step` (shaped and sharded like abstract_state); the
    iterator is moved to the saved position of its shards in place."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=InputShardsRestore(iterator)))
    return restored["state"]

  def close(self) -> None:
    self.manager.close()


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs with the shardings of `state`, for restoring into it."""
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
