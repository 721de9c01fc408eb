"""Expert capacity and drop policies, for any routing plan.

Capacity (GShard 2020; Switch Transformer 2021):

    C = ceil(capacity_factor * T * K / E),   K = A / T slots per token.

An expert keeps at most C of its assignments; the others become valid=False and
are counted, never lost silently. Which ones it keeps is the drop policy:

  position  earlier tokens first, and every token's first choice before any
            token's second choice (GShard/Switch).
  score     batch-prioritised routing (V-MoE, Riquelme et al. 2021): tokens
            ordered by their highest router probability, max_e p_te, and again
            all first choices before any second choice.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from moejax import grouping, validation
from moejax.core import RoutingPlan

Array = jax.Array

DROP_POLICIES = ("position", "score")


def validate(capacity_factor: Optional[float], drop_policy: str) -> None:
  """Raises ValueError naming the field for bad capacity settings."""
  if capacity_factor is not None:
    validation.in_range("capacity_factor", capacity_factor, 0, float("inf"), low_open=True)
  validation.one_of("drop_policy", drop_policy, DROP_POLICIES)


def capacity(num_tokens: int, slots_per_token: int, num_experts: int,
             capacity_factor: float) -> int:
  """C = ceil(capacity_factor * T * K / E), at least 1.

  The product is rounded to 9 significant digits first, so that a factor such as
  1.1, which float64 holds as 1.1000000000000001, does not add a slot.
  """
  validate(capacity_factor, "position")
  exact = capacity_factor * num_tokens * slots_per_token / num_experts
  return max(1, math.ceil(float(f"{exact:.9g}")))


def token_priority(probs: Array, policy: str) -> Array:
  """int32[T]: rank of each token under the drop policy (0 is kept first)."""
  num_tokens = probs.shape[0]
  if policy == "position":
    return jnp.arange(num_tokens, dtype=jnp.int32)
  if policy == "score":
    top1 = jnp.max(probs, axis=-1)
    order = jnp.argsort(-top1, stable=True)
    return jnp.zeros((num_tokens,), jnp.int32).at[order].set(
        jnp.arange(num_tokens, dtype=jnp.int32))
  validation.one_of("drop_policy", policy, DROP_POLICIES)


def apply_capacity(plan: RoutingPlan, probs: Array, num_experts: int,
                   capacity_per_expert: int, policy: str = "position"
                   ) -> tuple[RoutingPlan, dict[str, Array]]:
  """Keeps at most C valid assignments per expert.

  Args:
    plan: any plan over T = probs.shape[0] tokens.
    probs: float32[T, E_all], the router distribution (read by `score`).
    num_experts: E.
    capacity_per_expert: C.
    policy: `position` or `score`.

  Returns:
    The plan with the overflow made invalid, and metrics `dropped` (count) and
    `dropped_share` (dropped / valid before).
  """
  num_tokens = probs.shape[0]
  rank = grouping.choice_rank(plan.token, plan.valid, num_tokens)
  priority = rank * num_tokens + token_priority(probs, policy)[plan.token]
  position = grouping.position_in_expert(plan.expert, plan.valid, num_experts, priority)
  kept = plan.masked(position < capacity_per_expert)
  before = jnp.sum(plan.valid).astype(jnp.float32)
  dropped = before - jnp.sum(kept.valid).astype(jnp.float32)
  return kept, {"dropped": dropped,
                "dropped_share": dropped / jnp.maximum(before, 1.0)}
