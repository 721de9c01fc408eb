"""Routing fluctuation: how much the routing of fixed tokens changes between two traces.

"Improving Routing in Sparse Mixture of Experts with Graph of Tokens" (2025) and
StableMoE ("StableMoE: Stable Routing Strategy for Mixture of Experts", 2022)
measure it on a fixed evaluation batch between consecutive checkpoints. Per layer
l, over the T tokens of both traces:

  top1_changed[l] = mean_t [a.experts[l, t, 0] != b.experts[l, t, 0]]
  jaccard[l]      = mean_t 1 - |A_lt n B_lt| / |A_lt u B_lt|   (0 when both empty)

with A_lt, B_lt the sets of experts token t selected (before capacity). A token
that selected no expert has top-1 -1: it changed iff the other trace selected one.
Shapes: Y layers, T tokens, E experts.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from moejax.analysis.consistency import selected_one_hot
from moejax.analysis.trace import RoutingTrace, same_tokens


class Fluctuation(NamedTuple):
  """Per-layer fluctuation float[Y] and its mean over layers."""
  top1_changed: np.ndarray
  jaccard: np.ndarray
  mean_top1_changed: float
  mean_jaccard: float


def routing_fluctuation(a: RoutingTrace, b: RoutingTrace) -> Fluctuation:
  """Share of tokens whose top-1 expert changes, and mean Jaccard distance of the
  selected expert sets, per layer, between traces a and b of the same tokens.

  ValueError if a and b traced different tokens or models (`trace.same_tokens`),
  or hold no tokens.
  """
  same_tokens(a, b)
  if a.num_tokens == 0:
    raise ValueError("the two traces hold no tokens")
  top1 = np.mean(a.experts[..., 0] != b.experts[..., 0], axis=1).astype(np.float64)
  jaccard = np.zeros(a.num_layers, np.float64)
  for layer in range(a.num_layers):
    set_a, set_b = selected_one_hot(a, layer), selected_one_hot(b, layer)
    both = np.sum(set_a & set_b, axis=1)
    either = np.sum(set_a | set_b, axis=1)
    distance = np.where(either > 0, 1.0 - both / np.maximum(either, 1), 0.0)
    jaccard[layer] = distance.mean()
  return Fluctuation(top1, jaccard, float(top1.mean()), float(jaccard.mean()))
