"""Block-tiled grouped matmul in pure XLA, with a grouped backward.

  gmm(lhs [R, D], rhs [E, D, F], group_sizes [E]) -> out [R, F]
  out[r] = lhs[r] @ rhs[e(r)], rows ordered by group; rows at or beyond
  sum(group_sizes) are written as zeros.

Rows are cut into tiles of `block_size`. A tile that straddles a group boundary
is visited once per group it touches, and each visit writes only its group's
rows, so the work list has at most R/block_size + E - 1 items: a static bound
(the group metadata of megablox's gmm). The loop runs over the live items only
(`fori_loop` with a traced trip count), so padding rows cost nothing.

The backward is grouped too (a custom VJP): d lhs = gmm(d out, rhs^T) and
d rhs = tgmm(lhs, d out), the per-group lhs^T @ d out, accumulated in place.
Accumulation is float32; outputs take the input dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def _work_items(group_sizes: Array, num_tiles: int, block_size: int):
  """Static-length (group, tile) work list and the number of live items."""
  num_groups = group_sizes.shape[0]
  group_sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  first = starts // block_size
  last = (ends - 1) // block_size
  tiles = jnp.where(group_sizes > 0, last - first + 1, 0)
  num_items = num_tiles + num_groups - 1
  item_group = jnp.repeat(jnp.arange(num_groups, dtype=jnp.int32), tiles,
                          total_repeat_length=num_items)
  item_first = jnp.cumsum(tiles) - tiles
  item_tile = first[item_group] + jnp.arange(num_items, dtype=jnp.int32) - item_first[item_group]
  return item_group, item_tile, jnp.sum(tiles), starts, ends


def _pad_rows(x: Array, block_size: int) -> Array:
  pad = -x.shape[0] % block_size
  return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


def _tile_rows(tile, starts, ends, group, block_size):
  rows = tile * block_size + jnp.arange(block_size)
  return (rows >= starts[group]) & (rows < ends[group])


def _gmm(lhs, rhs, group_sizes, block_size, transpose_rhs):
  num_rows = lhs.shape[0]
  lhs = _pad_rows(lhs, block_size)
  num_tiles = lhs.shape[0] // block_size
  out_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  item_group, item_tile, live, starts, ends = _work_items(group_sizes, num_tiles, block_size)

  def visit(i, out):
    group, tile = item_group[i], item_tile[i]
    row0 = tile * block_size
    x = jax.lax.dynamic_slice_in_dim(lhs, row0, block_size)
    w = rhs[group]
    y = jnp.dot(x, w.T if transpose_rhs else w, preferred_element_type=jnp.float32)
    mask = _tile_rows(tile, starts, ends, group, block_size)
    current = jax.lax.dynamic_slice_in_dim(out, row0, block_size)
    tile_out = jnp.where(mask[:, None], y.astype(out.dtype), current)
    return jax.lax.dynamic_update_slice_in_dim(out, tile_out, row0, 0)

  out = jnp.zeros((lhs.shape[0], out_dim), lhs.dtype)
  out = jax.lax.fori_loop(0, live, visit, out)
  return out[:num_rows]


def tgmm(lhs: Array, grad: Array, group_sizes: Array, block_size: int = 128) -> Array:
  """Per-group lhs^T @ grad: [R, D], [R, F], [E] -> [E, D, F] (float32).

  Groups with no rows get zeros; rows beyond sum(group_sizes) are ignored.
  """
  lhs = _pad_rows(lhs, block_size)
  grad = _pad_rows(grad, block_size)
  num_tiles = lhs.shape[0] // block_size
  num_groups = group_sizes.shape[0]
  item_group, item_tile, live, starts, ends = _work_items(group_sizes, num_tiles, block_size)

  def visit(i, acc):
    group, tile = item_group[i], item_tile[i]
    row0 = tile * block_size
    mask = _tile_rows(tile, starts, ends, group, block_size)
    x = jax.lax.dynamic_slice_in_dim(lhs, row0, block_size)
    x = jnp.where(mask[:, None], x, jnp.zeros_like(x))
    g = jax.lax.dynamic_slice_in_dim(grad, row0, block_size)
    update = jnp.dot(x.T, g, preferred_element_type=jnp.float32)
    return acc.at[group].add(update)

  acc = jnp.zeros((num_groups, lhs.shape[1], grad.shape[1]), jnp.float32)
  return jax.lax.fori_loop(0, live, visit, acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gmm(lhs: Array, rhs: Array, group_sizes: Array, block_size: int = 128) -> Array:
  """Grouped matmul [R, D] x [E, D, F] -> [R, F]; see the module docstring."""
  return _gmm(lhs, rhs, group_sizes, block_size, transpose_rhs=False)


def _gmm_fwd(lhs, rhs, group_sizes, block_size):
  return gmm(lhs, rhs, group_sizes, block_size), (lhs, rhs, group_sizes)


def _gmm_bwd(block_size, residuals, grad):
  lhs, rhs, group_sizes = residuals
  d_lhs = _gmm(grad.astype(lhs.dtype), rhs, group_sizes, block_size, transpose_rhs=True)
  d_rhs = tgmm(lhs, grad, group_sizes, block_size).astype(rhs.dtype)
  return d_lhs, d_rhs, None


gmm.defvjp(_gmm_fwd, _gmm_bwd)
