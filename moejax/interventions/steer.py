"""Steering toward task experts ("Multilingual Routing in Mixture-of-Experts", 2025).

Each layer's experts used more on a reference set than on a contrast set are
promoted, on the rows being scored, by a logit bias of strength beta:

  u_l(S)[e]  share of layer l's selections over the tokens of set S that go to e
  lift_l[e]  u_l(reference)[e] - u_l(contrast)[e]
  delta_l    beta * 1[e among the `top` experts of largest lift_l]   (steered layers)

The paper promotes the middle layers' experts of a reference language and finds
that helps (1-2%) while steering outer layers, or steering too hard, hurts.

Choices where the paper is open: experts are picked by lift over a contrast set
(all of the evaluation data by default, in the CLI), not by raw use, because a
balanced router uses every expert about equally and raw use would pick at
random; the effect is reported per layer steered alone and per named group of
layers, as the per-row difference in mean nll against the plain model.

  expert_usage(frozen, rows)                  {layer: u_l [E']}
  steering_deltas(reference, contrast, ...)   {layer: delta_l [E']}
  steer_rows(frozen, rows, deltas, groups)    per-row nll, plain and steered
"""
from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from moejax import validation
from moejax.interventions import bias as biases
from moejax.interventions.frozen import Frozen, token_nll
from moejax.interventions.reroute import chosen_layers

Array = jax.Array


def _batches(rows: np.ndarray, size: int):
  for start in range(0, rows.shape[0], size):
    yield rows[start:start + size]


def expert_usage(frozen: Frozen, rows: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
  """{layer: u_l float64[E']}: the share of each layer's selections (before
  capacity) that go to each expert, over every token of rows int[N, L + 1]."""
  rows = np.asarray(rows, np.int32)
  width = biases.widths(frozen.zero_bias(1, rows.shape[1] - 1))

  def counts(tokens):
    _, aux = frozen.apply(tokens)
    out = {}
    for layer, a in aux.items():
      plan = a.plan if a.routed_plan is None else a.routed_plan
      out[layer] = jax.ops.segment_sum(plan.valid.astype(jnp.float32), plan.expert,
                                       num_segments=width[layer])
    return out

  total = {layer: np.zeros(w, np.float64) for layer, w in width.items()}
  for part in _batches(rows, batch):
    for layer, c in jax.device_get(counts(part[:, :-1])).items():
      total[layer] += c
  return {layer: c / max(c.sum(), 1.0) for layer, c in total.items()}


def steering_deltas(reference: Mapping[str, np.ndarray], contrast: Mapping[str, np.ndarray],
                    top: int, strength: float,
                    layers: Optional[tuple[str, ...]] = None) -> dict[str, np.ndarray]:
  """{layer: delta_l [E']}: strength on the `top` experts of largest lift in each
  chosen layer (all by default)."""
  layers = chosen_layers(reference, layers)
  out = {}
  for layer in layers:
    lift = np.asarray(reference[layer]) - np.asarray(contrast[layer])
    validation.positive_int("top", top)
    if top > lift.size:
      raise ValueError(f"top ({top}) must be <= the experts of {layer} ({lift.size})")
    delta = np.zeros(lift.size, np.float32)
    delta[np.argsort(-lift, kind="stable")[:top]] = strength
    out[layer] = delta
  return out


def rows_nll(frozen: Frozen, rows: np.ndarray, deltas: Optional[Mapping[str, np.ndarray]] = None,
             batch: int = 32) -> np.ndarray:
  """Mean nll per row float64[N] of rows int[N, L + 1] under the deltas (none:
  the plain model)."""
  rows = np.asarray(rows, np.int32)
  zero = frozen.zero_bias(1, rows.shape[1] - 1)
  collection = biases.to_collection(zero, deltas) if deltas else None
  return np.concatenate([np.asarray(jnp.mean(token_nll(frozen, part, collection), axis=1),
                                    np.float64) for part in _batches(rows, batch)])


def steer_rows(frozen: Frozen, rows: np.ndarray, deltas: Mapping[str, np.ndarray],
               groups: Optional[Mapping[str, tuple[str, ...]]] = None) -> dict[str, np.ndarray]:
  """Per-row mean nll of rows int[N, L + 1]: `plain`, then `layer_<i>` with that
  layer's delta alone, then each group {name: layers} with its layers' deltas."""
  out = {"plain": rows_nll(frozen, rows)}
  for layer, delta in deltas.items():
    out[layer] = rows_nll(frozen, rows, {layer: delta})
  for name, layers in (groups or {}).items():
    chosen = chosen_layers(deltas, layers, name=f"group {name!r}")
    out[name] = rows_nll(frozen, rows, {l: deltas[l] for l in chosen})
  return out
