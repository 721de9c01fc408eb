"""Expert parallelism: one device's part of the MoE FFN, inside shard_map.

With n devices on the expert axis, each holds E_l = E / n experts (global expert
e lives on device e // E_l) and its own shard of the tokens x [T_l, D] with a
plan over them (token ids local, expert ids global).

all_to_all_apply (GShard 2020; LLEP 2026 with settings.llep):
  1. each valid slot gets a destination: its expert's device, or with LLEP the
     device the spill plan gives its rank among the expert's rows
  2. rows travel there (exchange.fixed_exchange or ragged_exchange)
  3. the device runs them through its experts (and LLEP guests) with any engine
  4. outputs travel back; y[t] = sum over t's kept slots of weight * output

all_gather_apply (dropless):
  1. all_gather the axis' tokens and plans
  2. run this device's experts on every assignment to them
  3. reduce-scatter the weighted sums back to the token shards

Each returns y [T_l, D] and Stats. Nothing is dropped silently: `dropped`
counts the assignments that did not fit.
"""
from __future__ import annotations

import math
import flax.struct
import jax
import jax.numpy as jnp

from moejax import grouping
from moejax.core import RoutingPlan
from moejax.experts import ExpertFFN
from moejax.parallel import exchange, llep
from moejax.parallel.config import ExpertParallel

Array = jax.Array


class Stats(flax.struct.PyTreeNode):
  """Per device.

  Attributes:
    dropped: assignments of this device's tokens that did not fit.
    rows: valid rows this device ran through its experts.
    spilled: rows of this device's tokens that LLEP sent away from home.
  """

  dropped: Array
  rows: Array
  spilled: Array


def _rows_through_experts(received: exchange.Received, ffn: ExpertFFN, engine) -> Array:
  slots = received.rows.shape[0]
  plan = RoutingPlan(token=jnp.arange(slots, dtype=jnp.int32), expert=received.expert,
                     weight=jnp.ones((slots,), jnp.float32), valid=received.valid)
  return engine(received.rows, plan, ffn)


def _llep_destinations(plan: RoutingPlan, local_experts: int, settings: ExpertParallel,
                       axis_name: str) -> tuple[Array, Array, llep.SpillPlan]:
  """(device, index among that device's experts) of each slot under LLEP, and
  the spill plan. One all_gather of the devices' [E] counts gives both the
  group's global counts and each slot's rank among all rows of its expert
  (sources in axis order, then slot order)."""
  num_devices = jax.lax.axis_size(axis_name)
  num_experts = local_experts * num_devices
  counts = grouping.expert_counts(plan.expert, plan.valid, num_experts).astype(jnp.int32)
  table = jax.lax.all_gather(counts, axis_name)                    # [n, E]
  spill = llep.least_loaded_plan(
      jnp.sum(table, axis=0), num_devices, threshold=settings.llep_threshold,
      alpha=settings.llep_alpha, min_chunk=settings.llep_min_chunk,
      guest_slots=settings.llep_guest_slots)
  before = grouping.exclusive_cumsum(table, 0)[jax.lax.axis_index(axis_name)]
  rank = (before[jnp.where(plan.valid, plan.expert, 0)]
          + grouping.position_in_expert(plan.expert, plan.valid, num_experts))
  dest, local_expert = llep.slot_destinations(spill, plan.expert, rank)
  return dest, local_expert, spill


def buffer_size(settings: ExpertParallel, num_slots: int, num_devices: int) -> int:
  """Fixed: capacity per destination. Ragged: receive buffer rows."""
  cf = settings.capacity_factor
  if resolved_transport(settings) == "fixed":
    return num_slots if cf is None else max(1, math.ceil(cf * num_slots / num_devices))
  if cf is not None:
    return max(1, math.ceil(cf * num_slots))
  return num_devices * num_slots


def resolved_transport(settings: ExpertParallel) -> str:
  if settings.transport == "auto":
    return "ragged" if exchange.has_ragged_all_to_all() else "fixed"
  return settings.transport


def all_to_all_apply(x: Array, plan: RoutingPlan, ffn: ExpertFFN, engine,
                     settings: ExpertParallel, axis_name: str = "expert"
                     ) -> tuple[Array, Stats]:
  """One device's part of all_to_all expert parallelism (call inside shard_map).

  Args:
    x: [T_l, D], this device's tokens.
    plan: assignments of those tokens (token ids local, expert ids global).
    ffn: this device's experts, weights [E_l, ...].
    engine: runs the received rows (e.g. dispatch.create("sorted")).
    settings: transport, capacity and LLEP settings.
    axis_name: the mesh axis the experts are sharded over.
  """
  num_devices = jax.lax.axis_size(axis_name)
  local_experts = ffn.num_experts
  home = plan.expert // local_experts
  dest, local_expert = home, plan.expert % local_experts
  spilled = jnp.zeros((), jnp.float32)
  if settings.llep:
    dest, local_expert, spill = _llep_destinations(plan, local_experts, settings, axis_name)
    spilled = jnp.sum(plan.valid & (dest != home)).astype(jnp.float32)
    ffn = llep.with_guests(ffn, spill, axis_name)
  size = buffer_size(settings, plan.num_slots, num_devices)
  move = (exchange.ragged_exchange if resolved_transport(settings) == "ragged"
          else exchange.fixed_exchange)
  received = move(x, plan.token, dest, local_expert, plan.valid, size, axis_name)
  out = received.give_back(_rows_through_experts(received, ffn, engine))
  weight = jnp.where(received.kept, plan.weight, 0.0).astype(jnp.float32)
  y = jax.ops.segment_sum(out.astype(jnp.float32) * weight[:, None], plan.token,
                          num_segments=x.shape[0])
  stats = Stats(dropped=(jnp.sum(plan.valid) - jnp.sum(received.kept)).astype(jnp.float32),
                rows=jnp.sum(received.valid).astype(jnp.float32), spilled=spilled)
  return y.astype(x.dtype), stats


def all_gather_apply(x: Array, plan: RoutingPlan, ffn: ExpertFFN, engine,
                     axis_name: str = "expert") -> tuple[Array, Stats]:
  """One device's part of dropless all-gather expert parallelism (inside shard_map)."""
  num_devices = jax.lax.axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)
  num_tokens = x.shape[0]
  gather = lambda a: jax.lax.all_gather(a, axis_name, tiled=True)
  source = jnp.repeat(jnp.arange(num_devices, dtype=jnp.int32), plan.num_slots)
  expert = gather(plan.expert)
  valid = gather(plan.valid) & (expert // ffn.num_experts == me)
  mine = RoutingPlan(token=gather(plan.token) + source * num_tokens,
                     expert=expert % ffn.num_experts,
                     weight=jnp.where(valid, gather(plan.weight), 0.0), valid=valid)
  y_all = engine(gather(x), mine, ffn)                               # [n T_l, D]
  y = jax.lax.psum_scatter(y_all, axis_name, scatter_dimension=0, tiled=True)
  zero = jnp.zeros((), jnp.float32)
  return y, Stats(dropped=zero, rows=jnp.sum(valid).astype(jnp.float32), spilled=zero)


def expert_parallel_apply(x: Array, plan: RoutingPlan, ffn: ExpertFFN, engine,
                          settings: ExpertParallel,
                          axis_name: str = "expert") -> tuple[Array, Stats]:
  """all_to_all_apply or all_gather_apply, as settings.dispatch says."""
  if settings.dispatch == "all_gather":
    return all_gather_apply(x, plan, ffn, engine, axis_name)
  return all_to_all_apply(x, plan, ffn, engine, settings, axis_name)
