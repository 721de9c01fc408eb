"""Drops by position: which tokens a capacity limit drops.

"OpenMoE: An Early Effort on Open Mixture-of-Experts Language Models" (2024)
finds that later tokens of a sequence are dropped more: under the GShard/Switch
priority, earlier tokens fill the experts first.

`drop_rate_by_position` re-applies a capacity to a trace's selected assignments,
as `moejax.capacity` does in the layer. Tokens are routed in groups of
`sequences_per_group` consecutive sequences (in `trace.sequences()` order); each
group has, per expert,

  C = ceil(capacity_factor * T_g * K / E)     (moejax.capacity.capacity)

with T_g the group's traced tokens. An expert keeps the first C of its
assignments in priority order: every token's rank-0 choice before any token's
rank-1 choice, and so on; within a rank, tokens in order (`position`: sequence,
then position) or by the token's largest routing weight, descending (`score`,
V-MoE's batch-prioritised routing, as moejax.capacity's `score`; ties in token
order). The trace records weights[..., 0], which is the router's max_e p_te when
its weights are not renormalised over the top K.

Per position p (0..L-1): dropped selected assignments / selected assignments at
p; NaN where no token at p selected an expert. Shapes: T tokens, K experts per
token, E experts, L positions.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

from moejax import capacity as capacities
from moejax.analysis.consistency import check_layer, check_positive_int
from moejax.analysis.trace import RoutingTrace

POLICIES = ("position", "score")


class DropRates(NamedTuple):
  """Dropped share of selected assignments per position float[L], and overall."""
  by_position: np.ndarray
  overall: float


def _rates(trace: RoutingTrace, layer: int, dropped: np.ndarray) -> DropRates:
  """DropRates from bool[T, K] dropped (selected assignments only)."""
  selected = trace.experts[layer] >= 0
  length = int(trace.positions.max(initial=-1)) + 1
  chosen = np.bincount(trace.positions, weights=selected.sum(axis=1), minlength=length)
  lost = np.bincount(trace.positions, weights=(dropped & selected).sum(axis=1),
                     minlength=length)
  with np.errstate(invalid="ignore", divide="ignore"):
    by_position = np.where(chosen > 0, lost / np.maximum(chosen, 1), np.nan)
  overall = float(lost.sum() / chosen.sum()) if chosen.sum() > 0 else float("nan")
  return DropRates(by_position, overall)


def observed_drop_rate_by_position(trace: RoutingTrace, layer: int) -> DropRates:
  """The drops the traced model made: selected & ~kept, per position."""
  layer = check_layer(trace, layer)
  return _rates(trace, layer, ~trace.kept[layer])


def drop_rate_by_position(trace: RoutingTrace, layer: int, capacity_factor: float,
                          policy: str = "position", sequences_per_group: int = 1,
                          k: Optional[int] = None) -> DropRates:
  """The drops a capacity factor would make on the trace's selected assignments.

  Args:
    trace: any trace; its own `kept` is ignored.
    layer: the MoE layer.
    capacity_factor: > 0.
    policy: `position` or `score` (see the module docstring).
    sequences_per_group: sequences routed together (1: each sequence is a group;
      the layer itself routes a whole batch, padding included, as one group).
    k: slots per token K in C; default the trace's width (top_k for
      tokens-choose routers).
  """
  layer = check_layer(trace, layer)
  if (not isinstance(capacity_factor, (int, float)) or isinstance(capacity_factor, bool)
      or not math.isfinite(capacity_factor) or capacity_factor <= 0):
    raise ValueError(f"capacity_factor must be a finite number > 0, got {capacity_factor!r}")
  if policy not in POLICIES:
    raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
  sequences_per_group = check_positive_int("sequences_per_group", sequences_per_group)
  k = check_positive_int("k", trace.experts.shape[2] if k is None else k)

  seqs = trace.sequences()
  order = np.concatenate(seqs).astype(np.int64)           # token order: sequence, position
  token_rank = np.empty(trace.num_tokens, np.int64)
  token_rank[order] = np.arange(order.size)
  lengths = np.array([len(q) for q in seqs], np.int64)
  group = np.empty(trace.num_tokens, np.int64)
  group[order] = np.repeat(np.arange(len(seqs)) // sequences_per_group, lengths)
  group_tokens = np.bincount(group, minlength=1)
  cap = np.array([capacities.capacity(int(n), k, trace.num_experts, float(capacity_factor))
                  for n in group_tokens], np.int64)
  if policy == "position":
    priority = token_rank
  else:
    priority = np.empty(trace.num_tokens, np.int64)
    priority[np.lexsort((token_rank, -trace.weights[layer, :, 0]))] = np.arange(
        trace.num_tokens)

  experts = trace.experts[layer]
  selected = experts >= 0
  choice = np.cumsum(selected, axis=1) - 1                 # rank among the token's choices
  t, slot = np.nonzero(selected)
  expert = experts[t, slot].astype(np.int64)
  # Within (group, expert): all rank-0 choices first, then rank 1, ..., each by priority.
  ordering = np.lexsort((priority[t], choice[t, slot], expert, group[t]))
  key = (group[t] * trace.num_experts + expert)[ordering]
  run_start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
  run_len = np.diff(np.r_[run_start, key.size])
  place = np.arange(key.size) - np.repeat(run_start, run_len)
  dropped = np.zeros(experts.shape, bool)
  dropped[t[ordering], slot[ordering]] = place >= cap[group[t[ordering]]]
  return _rates(trace, layer, dropped)
