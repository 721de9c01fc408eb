"""Grouped matmuls in Pallas for TPU (Mosaic), with scalar-prefetched schedules.

The schedule (metadata.py) is prefetched into SMEM, and the BlockSpec index maps
read it, so each grid step's DMA brings exactly the row tile and weight tile of
one visit. Grids run in order on a TensorCore, so a tile visited by two groups
keeps its output block in VMEM between the visits (consecutive grid steps with
the same block index): each visit merges the rows of its group into the block.

  gmm    grid (N/bn, V, K/bk), accumulator [bm, bn] in VMEM.
         At the last K step the visit writes its group's rows; the first visit
         of a tile starts from zeros. The output aliases a zero buffer, so row
         tiles that no local group touches stay zero.
  tgmm   grid (K/bk, N/bn, V), accumulator [bk, bn]; a group's consecutive visits
         sum lhs_tile^T grad_tile over its rows and the last one stores d W[g].
         Every local group has a visit (an empty one: all rows masked), so every
         block of d W is written.

Rows arrive already gathered (ops.py gathers by row_index in XLA on this
target). Products accumulate in float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.varying import shape_like
from pallas_kernels.metadata import GroupTiles
from pallas_kernels.tiling import Tiles

Array = jax.Array
F32 = jnp.float32


def _interpret(interpret):
  """TPU interpret mode for `True`: it simulates VMEM (uninitialized buffers read
  as NaN) and the pipelining of blocks, so kernels are checked as a TPU runs them."""
  return pltpu.InterpretParams() if interpret is True else interpret


def _dot(a, b, contract_a: int, contract_b: int):
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                             preferred_element_type=F32)


def _in_group(start_ref, g, first_row, block_m):
  rows = first_row + jax.lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)
  return (rows >= start_ref[g]) & (rows < start_ref[g + 1])


def _gmm_kernel(start_ref, group_ref, tile_ref, first_ref, active_ref,
                lhs_ref, rhs_ref, zeros_ref, out_ref, acc_ref, *, tiles: Tiles,
                transpose_rhs: bool):
  del zeros_ref   # aliased to out: only its zeros matter
  v, kb = pl.program_id(1), pl.program_id(2)

  @pl.when(kb == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(active_ref[v] == 1)
  def _():
    if transpose_rhs:
      acc_ref[...] += _dot(lhs_ref[...], rhs_ref[...], 1, 1)
    else:
      acc_ref[...] += _dot(lhs_ref[...], rhs_ref[...], 1, 0)

  @pl.when((kb == pl.num_programs(2) - 1) & (active_ref[v] == 1))
  def _():
    keep = _in_group(start_ref, group_ref[v], tile_ref[v] * tiles.block_m, tiles.block_m)
    previous = jnp.where(first_ref[v] == 1, 0.0, out_ref[...].astype(F32))
    out_ref[...] = jnp.where(keep, acc_ref[...], previous).astype(out_ref.dtype)


def gmm(lhs: Array, rhs: Array, schedule: GroupTiles, row_index, num_rows: int,
        tiles: Tiles, transpose_rhs: bool, out_dtype, interpret,
        compiler_params=None) -> Array:
  """out [num_rows, N] from lhs [num_rows, K] and rhs [G, K, N] ([G, N, K])."""
  del compiler_params
  if row_index is not None:
    raise ValueError("the mosaic kernels take gathered rows (row_index=None)")
  bm, bk, bn = tiles.block_m, tiles.block_k, tiles.block_n
  num_out = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  num_groups = rhs.shape[0]
  last_group = num_groups - 1

  def rhs_index(n, v, k, start, group, tile, first, active):
    g = jnp.minimum(group[v], last_group)
    return (g, n, k) if transpose_rhs else (g, k, n)

  rhs_block = (None, bn, bk) if transpose_rhs else (None, bk, bn)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=5,
      grid=(num_out // bn, schedule.max_visits, lhs.shape[1] // bk),
      in_specs=[
          pl.BlockSpec((bm, bk), lambda n, v, k, start, group, tile, *_: (tile[v], k)),
          pl.BlockSpec(rhs_block, rhs_index),
          pl.BlockSpec(memory_space=pl.ANY),
      ],
      out_specs=pl.BlockSpec((bm, bn), lambda n, v, k, start, group, tile, *_: (tile[v], n)),
      scratch_shapes=[pltpu.VMEM((bm, bn), F32)])
  kernel = functools.partial(_gmm_kernel, tiles=tiles, transpose_rhs=transpose_rhs)
  zeros = jnp.zeros((num_rows, num_out), out_dtype)
  return pl.pallas_call(
      kernel,
      out_shape=shape_like((num_rows, num_out), out_dtype, lhs),
      grid_spec=grid_spec,
      input_output_aliases={7: 0},
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=_interpret(interpret), name="moejax_gmm_tpu",
  )(schedule.group_start, schedule.visit_group, schedule.visit_tile,
    schedule.visit_first, schedule.visit_active, lhs, rhs, zeros)


def _tgmm_kernel(start_ref, group_ref, tile_ref, first_ref, last_ref, active_ref,
                 lhs_ref, grad_ref, out_ref, acc_ref, *, tiles: Tiles):
  v = pl.program_id(2)

  @pl.when(first_ref[v] == 1)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(active_ref[v] == 1)
  def _():
    keep = _in_group(start_ref, group_ref[v], tile_ref[v] * tiles.block_m, tiles.block_m)
    x = jnp.where(keep, lhs_ref[...], jnp.zeros_like(lhs_ref))
    dy = jnp.where(keep, grad_ref[...], jnp.zeros_like(grad_ref))
    acc_ref[...] += _dot(x, dy, 0, 0)

  @pl.when(last_ref[v] == 1)
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs: Array, grad: Array, schedule: GroupTiles, row_index, tiles: Tiles,
         out_dtype, interpret, compiler_params=None) -> Array:
  """d W [G, K, N] from lhs [M, K] and grad [M, N]."""
  del compiler_params
  if row_index is not None:
    raise ValueError("the mosaic kernels take gathered rows (row_index=None)")
  bm, bk, bn = tiles.block_m, tiles.block_k, tiles.block_n
  num_groups, k, n = schedule.num_groups, lhs.shape[1], grad.shape[1]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=6,
      grid=(k // bk, n // bn, schedule.max_visits),
      in_specs=[
          pl.BlockSpec((bm, bk), lambda kb, nb, v, start, group, tile, *_: (tile[v], kb)),
          pl.BlockSpec((bm, bn), lambda kb, nb, v, start, group, tile, *_: (tile[v], nb)),
      ],
      out_specs=pl.BlockSpec((None, bk, bn),
                             lambda kb, nb, v, start, group, *_: (group[v], kb, nb)),
      scratch_shapes=[pltpu.VMEM((bk, bn), F32)])
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, tiles=tiles),
      out_shape=shape_like((num_groups, k, n), out_dtype, lhs),
      grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=_interpret(interpret), name="moejax_tgmm_tpu",
  )(schedule.group_start, schedule.visit_group, schedule.visit_tile,
    schedule.visit_group_first, schedule.visit_group_last, schedule.visit_active,
    lhs, grad)
