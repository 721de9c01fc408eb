"""Grouping assignment slots by expert: the sort shared by capacity and engines.

All functions are O(A log A) and keep static shapes. Invalid slots are put in an
extra group E that sorts last, so the first sum(group_sizes) sorted slots are
exactly the valid ones, grouped by expert in ascending order. The row helpers
exclusive_cumsum and read_rows are the kernels' (pallas_kernels.rows), offered
here with the rest.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.rows import exclusive_cumsum, read_rows

__all__ = ["choice_rank", "exclusive_cumsum", "expert_counts", "padded_layout",
           "position_in_expert", "read_rows", "sort_by_expert"]

Array = jax.Array


def _expert_key(expert: Array, valid: Array, num_experts: int) -> Array:
  return jnp.where(valid, expert, num_experts).astype(jnp.int32)


def expert_counts(expert: Array, valid: Array, num_experts: int) -> Array:
  """int32[E]: number of valid slots per expert."""
  key = _expert_key(expert, valid, num_experts)
  return jnp.bincount(key, length=num_experts + 1)[:num_experts].astype(jnp.int32)


def sort_by_expert(expert: Array, valid: Array, num_experts: int,
                   priority: Optional[Array] = None) -> tuple[Array, Array]:
  """Orders slots by expert, invalid slots last.

  Args:
    expert: int32[A].
    valid: bool[A].
    num_experts: E.
    priority: optional int32[A]; within an expert, lower priority comes first.
      Without it the sort is stable in slot order.

  Returns:
    order: int32[A], slot indices in grouped order.
    group_sizes: int32[E], valid slots per expert; sum(group_sizes) <= A.
  """
  key = _expert_key(expert, valid, num_experts)
  if priority is None:
    order = jnp.argsort(key, stable=True)
  else:
    order = jnp.lexsort((priority, key))
  return order.astype(jnp.int32), expert_counts(expert, valid, num_experts)


def position_in_expert(expert: Array, valid: Array, num_experts: int,
                       priority: Optional[Array] = None) -> Array:
  """int32[A]: rank of each valid slot among the slots of its expert.

  Ranks follow `priority` (lower first), then slot order. Invalid slots get a
  rank too (among the invalid ones) and must be masked by the caller.
  """
  order, group_sizes = sort_by_expert(expert, valid, num_experts, priority)
  key = _expert_key(expert, valid, num_experts)
  starts = exclusive_cumsum(group_sizes)
  starts = jnp.concatenate([starts, jnp.sum(group_sizes, keepdims=True)])
  ranks_sorted = jnp.arange(order.shape[0], dtype=jnp.int32) - starts[key[order]]
  return jnp.zeros_like(ranks_sorted).at[order].set(ranks_sorted)


def choice_rank(token: Array, valid: Array, num_tokens: int) -> Array:
  """int32[A]: k such that the slot is its token's (k+1)-th valid choice.

  Counts valid slots of the same token that come earlier in slot order, so for a
  tokens-choose plan (slot a = t * K + k) it is k, the rank of the choice.
  """
  return position_in_expert(token, valid, num_tokens)


def _round_up(n, multiple):
  return (n + multiple - 1) // multiple * multiple


def padded_layout(expert: Array, valid: Array, num_experts: int,
                  multiple: int) -> tuple[Array, Array, int]:
  """Places valid slots in rows grouped by expert, each group padded to `multiple`.

  Group e owns rows [start_e, start_e + padded_sizes[e]); its slots fill the run
  in slot order and padding follows.

  Returns:
    dest: int32[A], row of each slot; num_rows for invalid slots.
    padded_sizes: int32[E], group sizes rounded up to `multiple`.
    num_rows: static R = A + E * (multiple - 1), rounded up to `multiple`.
  """
  num_slots = expert.shape[0]
  num_rows = _round_up(num_slots + num_experts * (multiple - 1), multiple)
  position = position_in_expert(expert, valid, num_experts)
  padded_sizes = _round_up(expert_counts(expert, valid, num_experts), multiple)
  starts = exclusive_cumsum(padded_sizes)
  dest = jnp.where(valid, starts[jnp.where(valid, expert, 0)] + position, num_rows)
  return dest.astype(jnp.int32), padded_sizes.astype(jnp.int32), num_rows
