"""The einsum engine: GShard one-hot dispatch and combine (Lepikhin et al. 2020).

  dispatch [T, E, C] in {0, 1}: token t sits in slot c of expert e
  combine  [T, E, C]: the combine weight of that assignment
  x_e = einsum('tec,td->ecd', dispatch, x)          expert inputs [E, C, D]
  y_e = FFN_e(x_e)                                   batched over E
  y   = einsum('tec,ecd->td', combine, y_e)

Slot c of an assignment is its rank among the valid assignments of its expert.
With `capacity` = C the plan must already hold at most C assignments per expert
(the layer's capacity step drops and counts the overflow). Without a capacity the
engine uses C = T, exact for every plan (a token meets an expert at most once),
at O(T^2 E) memory: the classic path is meant to run with a capacity factor.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from moejax import grouping
from moejax.core import RoutingPlan
from moejax.experts import ExpertFFN

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class EinsumEngine:
  """One-hot dispatch/combine tensors [T, E, C]."""

  def __call__(self, x: Array, plan: RoutingPlan, ffn: ExpertFFN,
               capacity: Optional[int] = None) -> Array:
    """x [T, D], plan over A slots -> y [T, D]."""
    num_tokens, num_experts = x.shape[0], ffn.num_experts
    cap = num_tokens if capacity is None else capacity
    position = grouping.position_in_expert(plan.expert, plan.valid, num_experts)
    # Invalid slots point past the last slot and are dropped by the scatter.
    position = jnp.where(plan.valid, position, cap)
    index = (plan.token, plan.expert, position)
    shape = (num_tokens, num_experts, cap)
    dispatch = jnp.zeros(shape, x.dtype).at[index].set(1, mode="drop")
    weight = jnp.where(plan.valid, plan.weight, 0.0).astype(jnp.float32)
    combine = jnp.zeros(shape, jnp.float32).at[index].add(weight, mode="drop")
    x_e = jnp.einsum("tec,td->ecd", dispatch, x)
    y_e = ffn(x_e, lambda h, w: jnp.einsum("ecd,edf->ecf", h, w))
    y = jnp.einsum("tec,ecd->td", combine, y_e.astype(jnp.float32))
    return y.astype(x.dtype)
