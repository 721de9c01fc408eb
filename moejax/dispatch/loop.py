"""The loop engine: the test oracle. Obviously right, slow.

For each expert e: gather the rows of every slot, apply expert e, keep the slots
assigned to e and scatter their weighted outputs back to their tokens:

  y[t] = sum_e sum_a [token_a = t] [expert_a = e] valid_a weight_a f_e(x[token_a])

It does E times the expert FLOPs of a real engine.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from moejax.core import RoutingPlan
from moejax.experts import ExpertFFN

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LoopEngine:
  """Per-expert loop over all slots; the reference every engine must match."""

  def __call__(self, x: Array, plan: RoutingPlan, ffn: ExpertFFN,
               capacity: Optional[int] = None) -> Array:
    """x [T, D], plan over A slots -> y [T, D]. `capacity` is not used."""
    del capacity
    num_tokens = x.shape[0]
    rows = x[plan.token]
    weight = jnp.where(plan.valid, plan.weight, 0.0).astype(jnp.float32)

    def one_expert(y, e):
      out = ffn(rows, lambda h, w: jnp.dot(h, w[e])).astype(jnp.float32)
      coef = jnp.where(plan.expert == e, weight, 0.0)
      y = y + jax.ops.segment_sum(out * coef[:, None], plan.token, num_segments=num_tokens)
      return y, None

    y0 = jnp.zeros((num_tokens, x.shape[1]), jnp.float32)
    y, _ = jax.lax.scan(one_expert, y0, jnp.arange(ffn.num_experts))
    return y.astype(x.dtype)
