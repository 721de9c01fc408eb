"""The sorted engine: dropless execution with a grouped matmul (the default).

  order        stable argsort of the slots by expert, invalid slots last
  rows         x[token[order]]                         [A, D], grouped by expert
  out          FFN of rows, every product a grouped matmul over group_sizes [E]
  y[t]         sum of weight * out over the slots of token t (a segment sum)

Memory is O(A * D) for any E; nothing is dropped that the plan keeps. The grouped
matmul backend is `xla` (block-tiled, pure XLA) or `ragged_dot` (dispatch/gmm.py).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from moejax import grouping
from moejax.core import RoutingPlan
from moejax.dispatch import gmm as gmm_backends
from moejax.experts import ExpertFFN

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SortedEngine:
  """Sort by expert, grouped matmul, weighted combine.

  Attributes:
    backend: grouped-matmul backend, a key of dispatch.gmm.BACKENDS.
    block_size: row tile of the `xla` backend.
  """

  backend: str = "xla"
  block_size: int = 128

  def __post_init__(self):
    gmm_backends.get(self.backend, self.block_size)  # validates both fields

  def __call__(self, x: Array, plan: RoutingPlan, ffn: ExpertFFN,
               capacity: Optional[int] = None) -> Array:
    """x [T, D], plan over A slots -> y [T, D]. `capacity` is not used."""
    del capacity
    gmm = gmm_backends.get(self.backend, self.block_size)
    order, group_sizes = grouping.sort_by_expert(plan.expert, plan.valid, ffn.num_experts)
    token = plan.token[order]
    out = ffn(x[token], lambda h, w: gmm(h, w, group_sizes))
    weight = jnp.where(plan.valid, plan.weight, 0.0)[order].astype(jnp.float32)
    y = jax.ops.segment_sum(out.astype(jnp.float32) * weight[:, None], token,
                            num_segments=x.shape[0])
    return y.astype(x.dtype)
