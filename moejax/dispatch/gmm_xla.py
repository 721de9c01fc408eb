"""Block-tiled grouped matmuls in pure XLA, with fused dispatch and combine.

Rows live in a padded grouped layout: group e owns a run of rows whose length is
a multiple of the tile (block_size), so every tile belongs to exactly one group
and padding rows are zeros. `padded_sizes` [E] holds the run lengths. A
`fori_loop` visits the live tiles only; each visit is one [block, D] x [D, F]
matmul with the group's weights, accumulated in float32.

  gather_gmm  out[r] = x[row_index[r]] @ W[e(r)]                  [R, F]
              rows are read from x by index (fused dispatch: no gathered copy);
              an index outside x reads a zero row.
  gmm_scatter y[row_index[r]] += weight[r] * (h[r] @ W[e(r)])      [N, D]
              results are summed into their tokens in the loop (fused combine:
              no [R, D] output); an index outside y is dropped.

Both carry a custom VJP that is grouped too: d x and d W of gather_gmm in one
tiled loop (d W[e] = sum over e's tiles of x^T d out, accumulated in place), and
d h, d W, d weight of gmm_scatter in another, where d weight[r] = <g_r W^T, h_r>
with g_r = d y[row_index[r]], reusing the product that d h needs.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
F32 = jnp.float32


def tile_groups(padded_sizes: Array, num_tiles: int, block_size: int) -> tuple[Array, Array]:
  """Group of each tile [num_tiles] and the number of live tiles."""
  tiles = (padded_sizes // block_size).astype(jnp.int32)
  group = jnp.repeat(jnp.arange(tiles.shape[0], dtype=jnp.int32), tiles,
                     total_repeat_length=num_tiles)
  return group, jnp.sum(tiles)


def _read_rows(x: Array, index: Array) -> Array:
  return x.at[index].get(mode="fill", fill_value=0)


def _tile(a: Array, i, block_size: int) -> Array:
  return jax.lax.dynamic_slice_in_dim(a, i * block_size, block_size)


def _put_tile(a: Array, tile: Array, i, block_size: int) -> Array:
  return jax.lax.dynamic_update_slice_in_dim(a, tile.astype(a.dtype), i * block_size, 0)


def _dot(a, b):
  return jnp.dot(a, b, preferred_element_type=F32)


# ----------------------------------------------------------------------------
# gather_gmm: out[r] = x[row_index[r]] @ W[e(r)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def gather_gmm(x: Array, row_index: Array, rhs: Array, padded_sizes: Array,
               block_size: int) -> Array:
  """x [N, D], row_index [R], rhs [E, D, F], padded_sizes [E] -> [R, F]."""
  num_rows = row_index.shape[0]
  group, live = tile_groups(padded_sizes, num_rows // block_size, block_size)

  def visit(i, out):
    rows = _read_rows(x, _tile(row_index, i, block_size))
    return _put_tile(out, _dot(rows, rhs[group[i]]), i, block_size)

  out = jnp.zeros((num_rows, rhs.shape[2]), x.dtype)
  return jax.lax.fori_loop(0, live, visit, out)


def _gather_gmm_fwd(x, row_index, rhs, padded_sizes, block_size):
  out = gather_gmm(x, row_index, rhs, padded_sizes, block_size)
  return out, (x, row_index, rhs, padded_sizes)


def _gather_gmm_bwd(block_size, residuals, grad):
  x, row_index, rhs, padded_sizes = residuals
  group, live = tile_groups(padded_sizes, row_index.shape[0] // block_size, block_size)

  def visit(i, carry):
    d_x, d_rhs = carry
    index = _tile(row_index, i, block_size)
    g = _tile(grad, i, block_size)
    w = rhs[group[i]]
    d_x = d_x.at[index].add(_dot(g, w.T), mode="drop")
    d_rhs = d_rhs.at[group[i]].add(_dot(_read_rows(x, index).T, g))
    return d_x, d_rhs

  init = (jnp.zeros(x.shape, F32), jnp.zeros(rhs.shape, F32))
  d_x, d_rhs = jax.lax.fori_loop(0, live, visit, init)
  return d_x.astype(x.dtype), None, d_rhs.astype(rhs.dtype), None


gather_gmm.defvjp(_gather_gmm_fwd, _gather_gmm_bwd)


# ----------------------------------------------------------------------------
# gmm_scatter: y[row_index[r]] += weight[r] * (h[r] @ W[e(r)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def gmm_scatter(h: Array, rhs: Array, padded_sizes: Array, row_index: Array,
                weight: Array, num_out: int, block_size: int) -> Array:
  """h [R, F], rhs [E, F, D], padded_sizes [E], row_index [R], weight [R] -> [N, D]."""
  group, live = tile_groups(padded_sizes, h.shape[0] // block_size, block_size)

  def visit(i, y):
    out = _dot(_tile(h, i, block_size), rhs[group[i]])
    w = _tile(weight, i, block_size).astype(F32)
    return y.at[_tile(row_index, i, block_size)].add(out * w[:, None], mode="drop")

  y = jax.lax.fori_loop(0, live, visit, jnp.zeros((num_out, rhs.shape[2]), F32))
  return y.astype(h.dtype)


def _gmm_scatter_fwd(h, rhs, padded_sizes, row_index, weight, num_out, block_size):
  y = gmm_scatter(h, rhs, padded_sizes, row_index, weight, num_out, block_size)
  return y, (h, rhs, padded_sizes, row_index, weight)


def _gmm_scatter_bwd(num_out, block_size, residuals, grad):
  h, rhs, padded_sizes, row_index, weight = residuals
  group, live = tile_groups(padded_sizes, h.shape[0] // block_size, block_size)

  def visit(i, carry):
    d_h, d_rhs, d_weight = carry
    g = _read_rows(grad, _tile(row_index, i, block_size)).astype(F32)
    w = _tile(weight, i, block_size).astype(F32)
    h_tile = _tile(h, i, block_size)
    rhs_g = rhs[group[i]]
    g_rhs = _dot(g, rhs_g.T.astype(F32))                    # [block, F]
    d_h = _put_tile(d_h, g_rhs * w[:, None], i, block_size)
    d_weight = _put_tile(d_weight, jnp.sum(g_rhs * h_tile.astype(F32), axis=-1), i, block_size)
    d_rhs = d_rhs.at[group[i]].add(_dot(h_tile.T.astype(F32), g * w[:, None]))
    return d_h, d_rhs, d_weight

  init = (jnp.zeros(h.shape, F32), jnp.zeros(rhs.shape, F32), jnp.zeros(weight.shape, F32))
  d_h, d_rhs, d_weight = jax.lax.fori_loop(0, live, visit, init)
  return (d_h.astype(h.dtype), d_rhs.astype(rhs.dtype), None, None,
          d_weight.astype(weight.dtype))


gmm_scatter.defvjp(_gmm_scatter_fwd, _gmm_scatter_bwd)
