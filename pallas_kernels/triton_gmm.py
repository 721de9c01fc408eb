"""Grouped matmuls in Pallas for GPU (Triton lowering), with fused row gather.

One program per output tile. Shapes in axis letters: M rows of the grouped
layout, K contracted, N out, G local groups; the caller pads M, K and N to
multiples of their tiles (ops.py).

  gmm    grid (M/bm, N/bn). Tile m loops over its visits (metadata.py); visit
         (g, m) computes the tile's rows times W[g] over K in steps of bk and
         keeps the rows of group g:
             out[r] = sum over visits of [lo_g <= r < hi_g] * (lhs[src(r)] @ W[g])
         Rows in no local group (past the groups, or other devices' experts)
         come out as zeros, with no separate pass and no atomics.
  tgmm   grid (G, K/bk, N/bn). Group g loops over its visits and sums
             d W[g] = sum_r [lo_g <= r < hi_g] lhs[src(r)]^T d out[r]
         An empty group has one visit with every row masked: its block is zero.

`row_index` [M] fuses the dispatch: row r reads lhs[row_index[r]] (a gather
load of bm rows), and an index outside lhs reads a zero row. Without it row r
reads lhs[r]. `transpose_rhs` multiplies by W[g]^T, reading rhs [G, N, K] as
stored (the lhs gradient of a gmm, with no transposed copy of the weights).
Products accumulate in float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.varying import shape_like
from pallas_kernels.metadata import GroupTiles
from pallas_kernels.tiling import Tiles

Array = jax.Array
F32 = jnp.float32


def _whole(shape):
  """BlockSpec of a whole array (the kernel indexes it itself)."""
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _dot(a, b, contract_a: int, contract_b: int):
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                             preferred_element_type=F32)


def _rows(row_index_ref, lhs_ref, first_row, block_m: int):
  """Source rows of a row tile and whether each is inside lhs."""
  if row_index_ref is None:
    return first_row + jnp.arange(block_m), jnp.ones((block_m,), bool)
  src = row_index_ref[pl.ds(first_row, block_m)]
  inside = (src >= 0) & (src < lhs_ref.shape[0])
  return jnp.where(inside, src, 0), inside


def _load_rows(lhs_ref, src, cols, gathered: bool, first_row, block_m: int):
  if gathered:
    return lhs_ref[src, cols]
  return lhs_ref[pl.ds(first_row, block_m), cols]


def _gmm_kernel(start_ref, visit_group_ref, tile_visits_ref, row_index_ref, lhs_ref,
                rhs_ref, out_ref, *, tiles: Tiles, transpose_rhs: bool):
  bm, bk, bn = tiles.block_m, tiles.block_k, tiles.block_n
  tile, col = pl.program_id(0), pl.program_id(1)
  first_row = tile * bm
  rows = first_row + jnp.arange(bm)
  src, inside = _rows(row_index_ref, lhs_ref, first_row, bm)
  num_k = lhs_ref.shape[1] // bk

  def visit(v, acc):
    g = visit_group_ref[v]
    keep = (rows >= start_ref[g]) & (rows < start_ref[g + 1]) & inside

    def k_step(kk, part):
      x = _load_rows(lhs_ref, src, pl.ds(kk * bk, bk), row_index_ref is not None,
                     first_row, bm)
      if transpose_rhs:
        return part + _dot(x, rhs_ref[g, pl.ds(col * bn, bn), pl.ds(kk * bk, bk)], 1, 1)
      return part + _dot(x, rhs_ref[g, pl.ds(kk * bk, bk), pl.ds(col * bn, bn)], 1, 0)

    part = jax.lax.fori_loop(0, num_k, k_step, jnp.zeros((bm, bn), F32))
    return acc + jnp.where(keep[:, None], part, 0.0)

  acc = jax.lax.fori_loop(tile_visits_ref[tile], tile_visits_ref[tile + 1], visit,
                          jnp.zeros((bm, bn), F32))
  out_ref[...] = acc.astype(out_ref.dtype)


def gmm(lhs: Array, rhs: Array, schedule: GroupTiles, row_index: Array | None,
        num_rows: int, tiles: Tiles, transpose_rhs: bool, out_dtype, interpret,
        compiler_params=None) -> Array:
  """out [num_rows, N]; lhs [M or N_src, K], rhs [G, K, N] ([G, N, K] transposed)."""
  bm, bn = tiles.block_m, tiles.block_n
  num_out = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  kernel = functools.partial(_gmm_kernel, tiles=tiles, transpose_rhs=transpose_rhs)
  return _call(kernel, [schedule.group_start, schedule.visit_group, schedule.tile_visits],
               row_index, [lhs, rhs], shape_like((num_rows, num_out), out_dtype, lhs),
               (num_rows // bm, num_out // bn), pl.BlockSpec((bm, bn), lambda m, n: (m, n)),
               interpret, compiler_params, "moejax_gmm")


def _tgmm_kernel(start_ref, visit_tile_ref, group_visits_ref, row_index_ref, lhs_ref,
                 grad_ref, out_ref, *, tiles: Tiles):
  bm, bk, bn = tiles.block_m, tiles.block_k, tiles.block_n
  g, kb, nb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  lo, hi = start_ref[g], start_ref[g + 1]

  def visit(v, acc):
    first_row = visit_tile_ref[v] * bm
    rows = first_row + jnp.arange(bm)
    src, inside = _rows(row_index_ref, lhs_ref, first_row, bm)
    keep = ((rows >= lo) & (rows < hi) & inside)[:, None]
    x = _load_rows(lhs_ref, src, pl.ds(kb * bk, bk), row_index_ref is not None,
                   first_row, bm)
    dy = grad_ref[pl.ds(first_row, bm), pl.ds(nb * bn, bn)]
    x = jnp.where(keep, x, jnp.zeros_like(x))
    dy = jnp.where(keep, dy, jnp.zeros_like(dy))
    return acc + _dot(x, dy, 0, 0)

  acc = jax.lax.fori_loop(group_visits_ref[g], group_visits_ref[g + 1], visit,
                          jnp.zeros((bk, bn), F32))
  out_ref[...] = acc.astype(out_ref.dtype)


def tgmm(lhs: Array, grad: Array, schedule: GroupTiles, row_index: Array | None,
         tiles: Tiles, out_dtype, interpret, compiler_params=None) -> Array:
  """d W [G, K, N] from lhs [M or N_src, K] and grad [M, N]."""
  bk, bn = tiles.block_k, tiles.block_n
  num_groups, k, n = schedule.num_groups, lhs.shape[1], grad.shape[1]
  return _call(functools.partial(_tgmm_kernel, tiles=tiles),
               [schedule.group_start, schedule.visit_tile, schedule.group_visits],
               row_index, [lhs, grad], shape_like((num_groups, k, n), out_dtype, lhs),
               (num_groups, k // bk, n // bn),
               pl.BlockSpec((None, bk, bn), lambda g, kb, nb: (g, kb, nb)),
               interpret, compiler_params, "moejax_tgmm")


def _call(kernel, schedule_arrays, row_index, arrays, out_shape, grid, out_spec, interpret,
          compiler_params, name):
  """pallas_call of kernel(*schedule_refs, row_index_ref, *array_refs, out_ref), every
  input whole; without row_index the kernel gets None in its place."""
  if row_index is None:
    position = len(schedule_arrays)
    body = lambda *refs: kernel(*refs[:position], None, *refs[position:])
    operands = [*schedule_arrays, *arrays]
  else:
    body, operands = kernel, [*schedule_arrays, row_index, *arrays]
  return pl.pallas_call(
      body, out_shape=out_shape, grid=grid, in_specs=[_whole(a.shape) for a in operands],
      out_specs=out_spec, interpret=interpret, compiler_params=compiler_params,
      name=name)(*operands)
