"""Orbax checkpoints of the train state and the data iterator, with resume.

One orbax CheckpointManager per workdir (`<workdir>/checkpoints`, keep N). Each
checkpoint holds `state` (step, params, optimizer state, `routing` collection)
and `data` (the grain iterator's position), so a restarted run continues with
the same parameters and the same next batch. Saves are synchronous: a process
killed mid-save leaves the previous checkpoints intact (orbax finalises a save
by renaming its directory).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores (state, data iterator) under <workdir>/checkpoints."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, iterator: Any) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(iterator)), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any, iterator: Any) -> Any:
    """The state saved at `step` (shaped and sharded like abstract_state); the
    iterator is moved to the saved position in place."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(iterator)))
    return restored["state"]

  def close(self) -> None:
    self.manager.close()


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs with the shardings of `state`, for restoring into it."""
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
