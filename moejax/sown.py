"""The MoE layer's losses and metrics as sown collections (MoE(aux="sow")).

With aux="sow" the layer returns y alone, as an MLP block does, and sows its
weighted loss into `moe_losses` and its metrics into `moe_metrics`. A training
step applies the model with those collections mutable and adds one term:

  logits, sown = model.apply({"params": params}, x, rngs=..., mutable=moejax.SOWN)
  aux = moejax.sown_aux(sown)
  loss = task_loss(logits) + aux.loss

The layer sows nothing at init, so init's variables passed back to apply do not
count a loss twice. The collections are outputs of one apply, not state: keep
only `state` (the other mutable collections, e.g. `routing`) between steps.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
from flax.core import unfreeze

Array = jax.Array

LOSSES = "moe_losses"
METRICS = "moe_metrics"
SOWN = (LOSSES, METRICS)


class SownAux(flax.struct.PyTreeNode):
  """What sown_aux reads from an apply's mutated collections.

  Attributes:
    loss: the sum of every MoE layer's weighted loss (add it to the task loss).
    metrics: {module path: metrics} of each MoE layer ("block_0/moe", ...); a
      layer called n times in one apply has n entries ("path#i").
    state: the mutated collections other than the sown ones (e.g. `routing`).
  """

  loss: Array
  metrics: dict[str, Any]
  state: dict[str, Any]


def _leaves(tree: Mapping[str, Any], name: str, prefix: str = ""):
  """(path, sown tuple) of every entry `name` in a sown collection."""
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else key
    if key == name and isinstance(value, tuple):
      yield prefix, value
    elif isinstance(value, Mapping):
      yield from _leaves(value, name, path)


def sown_aux(mutated: Mapping[str, Any]) -> SownAux:
  """The total MoE loss, each layer's metrics and the remaining state from the
  mutated collections that `apply(..., mutable=...)` returned."""
  mutated = unfreeze(mutated) if hasattr(mutated, "unfreeze") else dict(mutated)
  loss = jnp.zeros((), jnp.float32)
  for _, values in _leaves(mutated.get(LOSSES, {}), "loss"):
    for value in values:
      loss = loss + value
  metrics = {}
  for path, values in _leaves(mutated.get(METRICS, {}), "metrics"):
    for i, value in enumerate(values):
      metrics[path if len(values) == 1 else f"{path}#{i}"] = value
  state = {k: v for k, v in mutated.items() if k not in SOWN}
  return SownAux(loss=loss, metrics=metrics, state=state)
