"""Soft MoE execution: slots through the layer's engine and experts.

  slots = einsum('bln,bld->bnd', dispatch, x)    [B, E*S, D]
  out   = engine(slots as rows, slot plan, ffn)  row b*E*S + s runs on expert s // S
  y     = einsum('bln,bnd->bld', combine, out)   [B, L, D]

The slot plan is a RoutingPlan whose "tokens" are slot rows (one assignment each,
weight 1), so Soft MoE runs on every engine and backend. For analysis the layer
reports `summary_plan`: each token's expert with the largest combine mass.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.core import RoutingPlan
from moejax.experts import ExpertFFN
from moejax.routers.soft import SoftRouting

Array = jax.Array


def slot_plan(batch: int, num_experts: int, slots_per_expert: int) -> RoutingPlan:
  """One weight-1 assignment per slot row: row b*E*S + s to expert s // S."""
  rows = jnp.arange(batch * num_experts * slots_per_expert, dtype=jnp.int32)
  expert = (rows % (num_experts * slots_per_expert)) // slots_per_expert
  return RoutingPlan(token=rows, expert=expert.astype(jnp.int32),
                     weight=jnp.ones(rows.shape, jnp.float32), valid=jnp.ones(rows.shape, bool))


def soft_moe(x: Array, routing: SoftRouting, engine, ffn: ExpertFFN) -> Array:
  """x [B, L, D] -> y [B, L, D] (dtype of x)."""
  batch, _, model_dim = x.shape
  num_slots = routing.dispatch.shape[-1]
  slots = jnp.einsum("bln,bld->bnd", routing.dispatch.astype(x.dtype), x)
  plan = slot_plan(batch, ffn.num_experts, routing.slots_per_expert)
  out = engine(slots.reshape(batch * num_slots, model_dim), plan, ffn)
  out = out.reshape(batch, num_slots, model_dim)
  return jnp.einsum("bln,bnd->bld", routing.combine.astype(x.dtype), out).astype(x.dtype)


def summary_plan(routing: SoftRouting) -> RoutingPlan:
  """Each token's expert with the largest combine mass, weighted by that mass."""
  probs = routing.probs
  expert = jnp.argmax(probs, axis=-1)
  weight = jnp.take_along_axis(probs, expert[:, None], axis=-1)
  return RoutingPlan.from_topk(expert[:, None].astype(jnp.int32), weight)
