"""Expert parallelism: experts sharded over a mesh axis, token rows exchanged with
all_to_all at a fixed capacity per destination (GShard 2020; the fixed-capacity
scheme of Switch and MaxText).

Runs inside shard_map, per device. With n devices on the expert axis, each holds
E_local = E / n experts (global expert e lives on device e // E_local) and its own
shard of the tokens, x [T_local, D], with a plan over them (global expert ids):

  1. each valid slot goes to device d = expert // E_local, at position p = its rank
     among the slots for d; slots with p >= C overflow: made invalid and counted
  2. send buffer [n, C, D] (row x[token]), local expert ids and validity alongside
  3. all_to_all over the axis: row [s, c] now holds source s's c-th row for us
  4. the local experts run on the n * C received rows (any engine, grouped by
     local expert)
  5. the reverse all_to_all returns each row's output to its source
  6. y[t] = sum over t's kept slots of weight * output

Nothing is dropped silently: `dropped` counts the overflowing assignments.
The engine must run under shard_map's varying-axis checks: `einsum` and `sorted`
with the `ragged_dot` backend do; the `xla` backend's loop carries are not yet
typed as varying over the mesh axes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax import grouping
from moejax.core import RoutingPlan
from moejax.experts import ExpertFFN

Array = jax.Array


def expert_parallel_apply(x: Array, plan: RoutingPlan, ffn: ExpertFFN, engine,
                          capacity: int, axis_name: str = "expert") -> tuple[Array, Array]:
  """One device's part of an expert-parallel MoE FFN (call inside shard_map).

  Args:
    x: [T_local, D], this device's tokens.
    plan: assignments of those tokens (token ids local, expert ids global).
    ffn: this device's experts, weights [E_local, ...].
    engine: executes the received rows (e.g. dispatch.create("sorted")).
    capacity: C, rows this device may send to each device of the axis.
    axis_name: the mesh axis the experts are sharded over.

  Returns:
    y [T_local, D] and `dropped`, this device's count of overflowing assignments.
  """
  num_devices = jax.lax.axis_size(axis_name)
  num_tokens, model_dim = x.shape
  local_experts = ffn.num_experts
  dest = plan.expert // local_experts
  position = grouping.position_in_expert(dest, plan.valid, num_devices)
  keep = plan.valid & (position < capacity)
  dropped = jnp.sum(plan.valid) - jnp.sum(keep)

  slots = num_devices * capacity
  flat = jnp.where(keep, dest * capacity + position, slots)           # overflow: dummy row

  def to_buffer(values, fill):
    buffer = jnp.full((slots + 1,) + values.shape[1:], fill, values.dtype)
    return buffer.at[flat].set(values)[:slots].reshape(
        (num_devices, capacity) + values.shape[1:])

  exchange = lambda a: jax.lax.all_to_all(a, axis_name, 0, 0, tiled=True)
  rows = exchange(to_buffer(x[plan.token], 0))
  row_expert = exchange(to_buffer(plan.expert % local_experts, 0))
  row_valid = exchange(to_buffer(keep, False))
  row_plan = RoutingPlan(token=jnp.arange(slots, dtype=jnp.int32),
                         expert=row_expert.reshape(-1).astype(jnp.int32),
                         weight=jnp.ones((slots,), jnp.float32),
                         valid=row_valid.reshape(-1))
  out = engine(rows.reshape(slots, model_dim), row_plan, ffn)
  back = exchange(out.reshape(num_devices, capacity, model_dim)).reshape(slots, model_dim)
  weight = jnp.where(keep, plan.weight, 0.0).astype(jnp.float32)
  contrib = back[jnp.minimum(flat, slots - 1)].astype(jnp.float32) * weight[:, None]
  y = jax.ops.segment_sum(contrib, plan.token, num_segments=num_tokens)
  return y.astype(x.dtype), dropped.astype(jnp.float32)
