"""Grouped-matmul backends of the sorted engine.

A backend runs the two kinds of products of an expert FFN over rows grouped by
expert, in a grouped layout where group e owns a run of `padded_sizes[e]` rows
(its assignments, then padding up to a multiple of `row_multiple`):

  gather_gmm(x [N, D], row_index [R], W [E, D, F], padded_sizes [E]) -> [R, F]
      out[r] = x[row_index[r]] @ W[e(r)]; an index outside x reads a zero row.
  gmm_scatter(h [R, F], W [E, F, D], padded_sizes, row_index [R], weight [R], N)
      -> y [N, D],  y[row_index[r]] += weight[r] * (h[r] @ W[e(r)]); an index
      outside y is dropped.

Rows beyond sum(padded_sizes) are outside every group: gather_gmm writes them as
zeros and gmm_scatter ignores them.

  xla         block-tiled loops in pure XLA, dispatch and combine fused into the
              matmuls, grouped backward (gmm_xla.py); groups padded to the tile.
  ragged_dot  jax.lax.ragged_dot on a gathered copy, combine by segment sum;
              contiguous groups. On some backends it runs densely: measure.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax import validation
from moejax.dispatch import gmm_xla

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RaggedDotBackend:
  """jax.lax.ragged_dot with float32 accumulation."""

  row_multiple: int = dataclasses.field(default=1, init=False)

  def gmm(self, lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                             preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)

  def gather_gmm(self, x, row_index, rhs, padded_sizes):
    return self.gmm(x.at[row_index].get(mode="fill", fill_value=0), rhs, padded_sizes)

  def gmm_scatter(self, h, rhs, padded_sizes, row_index, weight, num_out):
    out = self.gmm(h, rhs, padded_sizes).astype(jnp.float32)
    y = jax.ops.segment_sum(out * weight[:, None].astype(jnp.float32), row_index,
                            num_segments=num_out)
    return y.astype(h.dtype)


@dataclasses.dataclass(frozen=True)
class XlaBackend:
  """Tiled loops with fused dispatch and combine; groups padded to block_size."""

  block_size: int = 128

  def __post_init__(self):
    validation.positive_int("block_size", self.block_size)

  @property
  def row_multiple(self) -> int:
    return self.block_size

  def gather_gmm(self, x, row_index, rhs, padded_sizes):
    return gmm_xla.gather_gmm(x, row_index, rhs, padded_sizes, self.block_size)

  def gmm_scatter(self, h, rhs, padded_sizes, row_index, weight, num_out):
    return gmm_xla.gmm_scatter(h, rhs, padded_sizes, row_index, weight, num_out,
                               self.block_size)


BACKENDS = {"xla": XlaBackend, "ragged_dot": RaggedDotBackend}


def create(backend: str, block_size: int = 128):
  """Backend `backend`; block_size is the row tile of `xla`."""
  validation.one_of("backend", backend, tuple(BACKENDS))
  validation.positive_int("block_size", block_size)
  return XlaBackend(block_size) if backend == "xla" else BACKENDS[backend]()
