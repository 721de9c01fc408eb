"""The sorted engine: dropless execution with grouped matmuls (the default).

  dest          row of each valid slot in a layout grouped by expert, each group
                padded to the backend's row multiple (grouping.padded_layout)
  row_index     token read by each row [R]; padding rows read nothing
  h             first FFN products, x[row_index] @ W_i[e], grouped   [R, F]
  y[t]          sum over the rows of token t of weight * (h @ W_o[e])  [T, D]

Dispatch and combine go through the backend (dispatch/gmm.py): `xla` fuses both
into its tiled matmuls, so no [A, D] copy of the tokens is made; `pallas` reads
rows by index in its kernel and combines with an atomic-free gather-sum;
`ragged_dot` gathers, multiplies and segment-sums. Memory is O(A * F) activations for any E,
and nothing the plan keeps is dropped.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

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
    backend: grouped-matmul backend, a key of dispatch.gmm.BACKENDS (`auto`:
      the backend checked on the running platform, dispatch.gmm.AUTO_BACKEND).
    block_size: row tile of the `xla` backend.
    kernel_settings: pallas_kernels.KernelSettings of the `pallas` backend.
  """

  backend: str = "auto"
  block_size: int = 128
  kernel_settings: Optional[Any] = None

  def __post_init__(self):
    self._backend()  # validates the fields

  def _backend(self):
    return gmm_backends.create(self.backend, self.block_size, self.kernel_settings)

  def __call__(self, x: Array, plan: RoutingPlan, ffn: ExpertFFN,
               capacity: Optional[int] = None) -> Array:
    """x [T, D], plan over A slots -> y [T, D]. `capacity` is not used."""
    del capacity
    num_tokens = x.shape[0]
    backend = self._backend()
    dest, padded_sizes, num_rows = grouping.padded_layout(
        plan.expert, plan.valid, ffn.num_experts, backend.row_multiple)
    row_index = jnp.full((num_rows,), num_tokens, jnp.int32).at[dest].set(
        plan.token, mode="drop")
    weight = jnp.where(plan.valid, plan.weight, 0.0)
    row_weight = jnp.zeros((num_rows,), weight.dtype).at[dest].set(weight, mode="drop")
    return ffn(
        x,
        lambda x, w: backend.gather_gmm(x, row_index, w, padded_sizes),
        lambda h, w: backend.gmm_scatter(h, w, padded_sizes, row_index, row_weight,
                                         num_tokens))
