"""Combination diversity: how many distinct expert sets and paths tokens take.

RMoE ("Layerwise Recurrent Router for Mixture-of-Experts", 2024) credits part of
its gain to more diverse expert combinations. Per layer, a token's combination is
its unordered set of selected experts (before capacity); across layers, its path
is the tuple of its Y sets. The empty set (a token that selected nothing) counts
as one combination. Shares are over the T tokens (count / T; NaN when T = 0).
Shapes: Y layers, T tokens, K experts per token.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from moejax.analysis.consistency import check_layer
from moejax.analysis.trace import RoutingTrace


class Diversity(NamedTuple):
  """Number of distinct combinations (or paths) and that number / T."""
  count: int
  share: float


def _distinct_rows(rows: np.ndarray, num_tokens: int) -> Diversity:
  count = int(np.unique(rows, axis=0).shape[0]) if num_tokens else 0
  return Diversity(count, count / num_tokens if num_tokens else float("nan"))


def distinct_combinations(trace: RoutingTrace, layer: int) -> Diversity:
  """Distinct unordered sets of selected experts at `layer`."""
  layer = check_layer(trace, layer)
  sets = np.sort(trace.experts[layer], axis=1)                     # padding -1 first
  return _distinct_rows(sets, trace.num_tokens)


def distinct_paths(trace: RoutingTrace) -> Diversity:
  """Distinct tuples (set at layer 0, ..., set at layer Y-1) over all layers."""
  sets = np.sort(trace.experts, axis=2)                            # [Y, T, K]
  rows = np.transpose(sets, (1, 0, 2)).reshape(trace.num_tokens, -1)
  return _distinct_rows(rows, trace.num_tokens)
