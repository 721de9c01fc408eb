"""Block-tiled grouped matmuls in pure XLA, with fused dispatch and combine.

Rows live in a padded grouped layout: group e owns a run of rows whose length is
a multiple of the tile (block_size), so every tile belongs to exactly one group
and padding rows are zeros. `padded_sizes` [E] holds the run lengths. An outer
loop over groups slices the group's weights once; an inner `fori_loop` with a
traced trip count visits that group's tiles only, one [block, D] x [D, F] matmul
each, accumulated in float32. (On a 2-core CPU, tiles of 128 to 256 rows run near
the speed of one large matmul; mixing tile sizes to cut padding did not pay.)

  gather_gmm  out[r] = x[row_index[r]] @ W[e(r)]                  [R, F]
              rows are read from x by index (fused dispatch: no gathered copy);
              an index outside x reads a zero row.
  gmm_scatter y[row_index[r]] += weight[r] * (h[r] @ W[e(r)])      [N, D]
              results are summed into their tokens in the loop (fused combine:
              no [R, D] output); an index outside y is dropped.

Both carry a custom VJP that is grouped too. d W[e] = sum over e's tiles of
x_tile^T d out_tile is accumulated in a [D, F] loop carry and stored once per
group; d x is scattered back to its tokens tile by tile; for gmm_scatter,
d weight[r] = <g_r W^T, h_r> with g_r = d y[row_index[r]] reuses the product
that d h needs.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pallas_kernels.rows import exclusive_cumsum, read_rows
from pallas_kernels.varying import cotangent, vary_like

Array = jax.Array
F32 = jnp.float32


def _for_each_tile(padded_sizes: Array, block_size: int,
                   visit_group: Callable[..., Any], carry: Any) -> Any:
  """Runs the tiles of every group; returns the final carry.

  For each group e, `visit_group(e, tiled, carry)` is called with
  `tiled(visit_tile, carry)`, which calls `visit_tile(row, block_size, carry)` for
  the first row of each of e's tiles, in a loop with a traced trip count.
  """
  starts = exclusive_cumsum(padded_sizes)

  def one_group(e, carry):
    start = starts[e]

    def tiled(visit_tile, carry):
      return jax.lax.fori_loop(
          0, padded_sizes[e] // block_size,
          lambda j, c: visit_tile(start + j * block_size, block_size, c), carry)
    return visit_group(e, tiled, carry)

  return jax.lax.fori_loop(0, padded_sizes.shape[0], one_group, carry)


def _zeros(shape, dtype, *operands: Array) -> Array:
  """Zeros for a loop carry, varying over the mesh axes of `operands` (a
  shard_map loop carry must keep the type of the body's result)."""
  return vary_like(jnp.zeros(shape, dtype), *operands)



def _tile(a: Array, row, size: int) -> Array:
  return jax.lax.dynamic_slice_in_dim(a, row, size)


def _put_tile(a: Array, tile: Array, row) -> Array:
  return jax.lax.dynamic_update_slice_in_dim(a, tile.astype(a.dtype), row, 0)


def _operand(a: Array) -> Array:
  """Matmul operand dtype. The CPU has no fast half-precision GEMM and XLA would
  convert inside every tile, so there half precision is widened once, up front
  (exact: products are accumulated in float32 either way)."""
  if jax.default_backend() == "cpu" and jnp.dtype(a.dtype).itemsize < 4:
    return a.astype(F32)
  return a


def _dot(a, b):
  a = _operand(a)
  return jnp.dot(a, b.astype(a.dtype), preferred_element_type=F32)


# ----------------------------------------------------------------------------
# gather_gmm: out[r] = x[row_index[r]] @ W[e(r)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def gather_gmm(x: Array, row_index: Array, rhs: Array, padded_sizes: Array,
               block_size: int) -> Array:
  """x [N, D], row_index [R], rhs [E, D, F], padded_sizes [E] -> [R, F]."""
  def visit_group(e, tiled, out):
    w = _operand(rhs[e])

    def visit(row, size, out):
      rows = read_rows(x, _tile(row_index, row, size))
      return _put_tile(out, _dot(rows, w), row)
    return tiled(visit, out)

  out = _zeros((row_index.shape[0], rhs.shape[2]), x.dtype, x, row_index, rhs, padded_sizes)
  return _for_each_tile(padded_sizes, block_size, visit_group, out)


def _gather_gmm_fwd(x, row_index, rhs, padded_sizes, block_size):
  out = gather_gmm(x, row_index, rhs, padded_sizes, block_size)
  return out, (x, row_index, rhs, padded_sizes)


def _gather_gmm_bwd(block_size, residuals, grad):
  x, row_index, rhs, padded_sizes = residuals

  def visit_group(e, tiled, carry):
    d_x, d_rhs = carry
    w_t = _operand(rhs[e]).T

    def visit(row, size, c):
      d_x, acc = c
      index = _tile(row_index, row, size)
      g = _tile(grad, row, size)
      d_x = d_x.at[index].add(_dot(g, w_t), mode="drop")
      return d_x, acc + _dot(read_rows(x, index).T, g)
    d_x, acc = tiled(visit, (d_x, _zeros(rhs.shape[1:], F32, *operands)))
    return d_x, d_rhs.at[e].set(acc.astype(d_rhs.dtype))

  operands = (x, row_index, rhs, padded_sizes, grad)
  init = (_zeros(x.shape, F32, *operands), _zeros(rhs.shape, rhs.dtype, *operands))
  d_x, d_rhs = _for_each_tile(padded_sizes, block_size, visit_group, init)
  return cotangent(d_x.astype(x.dtype), x), None, cotangent(d_rhs, rhs), None


gather_gmm.defvjp(_gather_gmm_fwd, _gather_gmm_bwd)


# ----------------------------------------------------------------------------
# gmm_scatter: y[row_index[r]] += weight[r] * (h[r] @ W[e(r)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def gmm_scatter(h: Array, rhs: Array, padded_sizes: Array, row_index: Array,
                weight: Array, num_out: int, block_size: int) -> Array:
  """h [R, F], rhs [E, F, D], padded_sizes [E], row_index [R], weight [R] -> [N, D]."""
  def visit_group(e, tiled, y):
    w = _operand(rhs[e])

    def visit(row, size, y):
      out = _dot(_tile(h, row, size), w)
      scale = _tile(weight, row, size).astype(F32)
      return y.at[_tile(row_index, row, size)].add(out * scale[:, None], mode="drop")
    return tiled(visit, y)

  y = _zeros((num_out, rhs.shape[2]), F32, h, rhs, padded_sizes, row_index, weight)
  return _for_each_tile(padded_sizes, block_size, visit_group, y).astype(h.dtype)


def _gmm_scatter_fwd(h, rhs, padded_sizes, row_index, weight, num_out, block_size):
  y = gmm_scatter(h, rhs, padded_sizes, row_index, weight, num_out, block_size)
  return y, (h, rhs, padded_sizes, row_index, weight)


def _gmm_scatter_bwd(num_out, block_size, residuals, grad):
  del num_out
  h, rhs, padded_sizes, row_index, weight = residuals

  def visit_group(e, tiled, carry):
    d_h, d_rhs, d_weight = carry
    w_t = _operand(rhs[e]).T

    def visit(row, size, c):
      d_h, d_weight, acc = c
      g = read_rows(grad, _tile(row_index, row, size))
      scale = _tile(weight, row, size).astype(F32)[:, None]
      h_tile = _tile(h, row, size)
      g_w = _dot(g, w_t)                                    # [size, F]
      d_h = _put_tile(d_h, g_w * scale, row)
      d_weight = _put_tile(d_weight, jnp.sum(g_w * h_tile.astype(F32), axis=-1), row)
      acc = acc + _dot(h_tile.T, g.astype(F32) * scale)
      return d_h, d_weight, acc
    d_h, d_weight, acc = tiled(visit, (d_h, d_weight, _zeros(rhs.shape[1:], F32, *operands)))
    return d_h, d_rhs.at[e].set(acc.astype(d_rhs.dtype)), d_weight

  operands = (h, rhs, padded_sizes, row_index, weight, grad)
  init = (_zeros(h.shape, h.dtype, *operands), _zeros(rhs.shape, rhs.dtype, *operands),
          _zeros(weight.shape, F32, *operands))
  d_h, d_rhs, d_weight = _for_each_tile(padded_sizes, block_size, visit_group, init)
  return (cotangent(d_h, h), cotangent(d_rhs, rhs), None, None,
          cotangent(d_weight.astype(weight.dtype), weight))


gmm_scatter.defvjp(_gmm_scatter_fwd, _gmm_scatter_bwd)
