"""The oracle routing gap: how far a sequence's loss falls when its routing is
chosen for it (the premise of RoMA, 2025: learned routing trails the
per-sample oracle by 10-20%).

For each sequence s (a row of tokens) and each MoE layer l, a bounded set of
logit biases is searched, the one bias per layer whose routing gives the
sequence's own loss its minimum:

  candidates  C = {0} U {a * e_j : a in strengths, j < E'}      (2 E' + 1 by default)
  per layer   g_l(s) = nll(s) - min_{c in C} nll(s; delta_l = c, other layers 0)
  joint       coordinate descent over the layers in order, `passes` times, each
              layer's c chosen with the others held at their current choice;
              g(s) = nll(s) - nll(s; chosen deltas)

Both gaps are >= 0 (0 is a candidate). They are in-sample: the search reads the
loss it reports, so they bound from above what any routing of this family
could gain on that sequence, not what a method that must choose without the
answer would. Reported per layer and in total, in nats and as a share of the
plain loss.

Choices where the method is open: a bias that promotes or demotes one expert
for a whole sequence (by default a = +-3, enough to move an expert in or out of
most of the sequence's top-K sets) rather than a search over top-K sets, whose
count grows as C(E, K) per token; the candidates of all sequences run batched,
one row per (sequence, candidate) with per-sequence deltas.

  oracle_gap(frozen, rows, strengths, layers, passes)
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moejax import validation
from moejax.interventions import bias as biases
from moejax.interventions.frozen import Frozen, token_nll
from moejax.interventions.reroute import chosen_layers

Array = jax.Array
DEFAULT_STRENGTHS = (3.0, -3.0)


def candidate_deltas(width: int, strengths: Sequence[float]) -> np.ndarray:
  """float32[C, E']: the zero bias, then a * e_j for each strength a and expert j."""
  rows = [np.zeros(width, np.float32)]
  for a in strengths:
    rows.extend(a * np.eye(width, dtype=np.float32))
  return np.stack(rows)


def oracle_gap(frozen: Frozen, rows: np.ndarray, strengths: Sequence[float] = DEFAULT_STRENGTHS,
               layers: Optional[tuple[str, ...]] = None, passes: int = 1,
               rows_per_call: int = 256) -> dict[str, Any]:
  """The per-layer and joint oracle gaps of rows int[N, L + 1] (module docstring).

  Returns per-row arrays: `plain` [N]; `per_layer` {layer: best nll with that
  layer alone searched}; `oracle` [N], the joint search's nll; `choice`
  {layer: int[N], the chosen candidate (0: no bias; 1 + i * E' + j: strengths[i]
  on expert j)}."""
  rows = np.asarray(rows, np.int32)
  if rows.ndim != 2 or rows.shape[1] < 2:
    raise ValueError(f"rows must be int[N, L + 1], got shape {rows.shape}")
  if not strengths or any(a == 0 for a in strengths):
    raise ValueError(f"strengths must be non-zero biases, got {tuple(strengths)}")
  validation.positive_int("passes", passes)
  zero = frozen.zero_bias(1, rows.shape[1] - 1)
  width = biases.widths(zero)
  layers = chosen_layers(width, layers)
  cands = {l: candidate_deltas(width[l], strengths) for l in layers}

  def evaluate(choice: dict[str, np.ndarray], layer: str) -> np.ndarray:
    """nll [N, C]: every candidate of `layer`, the other layers at `choice`."""
    count = cands[layer].shape[0]
    out = np.empty((rows.shape[0], count), np.float64)
    per_call = max(1, rows_per_call // count)
    for start in range(0, rows.shape[0], per_call):
      part = rows[start:start + per_call]
      n = part.shape[0]
      deltas = {}
      for l in layers:
        if l == layer:
          deltas[l] = np.tile(cands[l], (n, 1))
        else:
          deltas[l] = np.repeat(cands[l][choice[l][start:start + n]], count, axis=0)
      nll = token_nll(frozen, np.repeat(part, count, axis=0),
                      biases.to_collection(zero, deltas))
      out[start:start + n] = np.asarray(jnp.mean(nll, axis=1), np.float64).reshape(n, count)
    return out

  none = {l: np.zeros(rows.shape[0], np.int64) for l in layers}
  per_layer, plain = {}, None
  for layer in layers:
    nll = evaluate(none, layer)
    plain = nll[:, 0] if plain is None else plain
    per_layer[layer] = nll.min(axis=1)
  choice = dict(none)
  oracle = plain
  for _ in range(passes):
    for layer in layers:
      nll = evaluate(choice, layer)
      choice[layer] = nll.argmin(axis=1)
      oracle = nll.min(axis=1)
  return {"plain": plain, "per_layer": per_layer, "oracle": oracle, "choice": choice,
          "strengths": tuple(float(a) for a in strengths), "layers": layers}


def summary(result: dict[str, Any]) -> dict[str, Any]:
  """Means over rows: plain nll, each layer's gap and the joint gap, in nats and
  as a share of the plain nll."""
  plain = float(np.mean(result["plain"]))
  out = {"rows": int(result["plain"].size), "plain_nll": plain,
         "oracle_nll": float(np.mean(result["oracle"])),
         "gap": float(np.mean(result["plain"] - result["oracle"]))}
  out["gap_share"] = out["gap"] / plain if plain else float("nan")
  out["per_layer_gap"] = {l: float(np.mean(result["plain"] - v))
                          for l, v in result["per_layer"].items()}
  return out
