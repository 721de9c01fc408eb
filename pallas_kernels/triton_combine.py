"""Weighted gather-sum of grouped rows back to their tokens, without atomics.

  y[t] = sum over rows r with row_index[r] = t of weight[r] * rows[r]     [T, D]

Rows are sorted by token once (XLA, ops.py), so the rows of a tile of bt tokens
form one run [lo_i, hi_i) of the sorted order. One program per (token tile,
column tile) walks its run in chunks of bs: it gathers the chunk's rows, builds
the [bt, bs] matrix of weights at (token - first token, chunk position), and
adds that matrix times the rows. Each output tile is written by one program
only, so no atomics are needed and the sum does not depend on scheduling; a
token may have any number of rows (top-k, expert choice, ...).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import checks
from pallas_kernels.varying import shape_like

Array = jax.Array
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class CombineTiles:
  """block_t tokens per tile, block_s sorted rows per chunk, block_d columns."""

  block_t: int = 32
  block_s: int = 64
  block_d: int = 128

  def __post_init__(self):
    checks.positive_fields(self, ("block_t", "block_s", "block_d"))


def _whole(shape):
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _combine_kernel(bounds_ref, order_ref, token_ref, weight_ref, rows_ref, out_ref, *,
                    tiles: CombineTiles, exact: bool):
  bt, bs, bd = tiles.block_t, tiles.block_s, tiles.block_d
  tile, col = pl.program_id(0), pl.program_id(1)
  lo, hi = bounds_ref[tile], bounds_ref[tile + 1]
  slot = jnp.arange(bt)[:, None]

  def chunk(j, acc):
    start = lo + j * bs
    valid = start + jnp.arange(bs) < hi
    vals = rows_ref[order_ref[pl.ds(start, bs)], pl.ds(col * bd, bd)]
    vals = jnp.where(valid[:, None], vals, jnp.zeros_like(vals))
    token = token_ref[pl.ds(start, bs)] - tile * bt
    hit = (token[None, :] == slot) & valid[None, :]                     # [bt, bs]
    weight = weight_ref[pl.ds(start, bs)]
    if exact:   # float32 rows: weights in the matrix, full-precision products
      matrix = jnp.where(hit, weight[None, :], 0.0)
      return acc + jax.lax.dot(matrix, vals.astype(F32), precision=jax.lax.Precision.HIGHEST,
                               preferred_element_type=F32)
    # Half-precision rows: a 0/1 matrix times the weighted rows, on tensor cores.
    scaled = (vals.astype(F32) * weight[:, None]).astype(vals.dtype)
    return acc + jax.lax.dot(hit.astype(vals.dtype), scaled, preferred_element_type=F32)

  num_chunks = (hi - lo + bs - 1) // bs
  acc = jax.lax.fori_loop(0, num_chunks, chunk, jnp.zeros((bt, bd), F32))
  out_ref[...] = acc.astype(out_ref.dtype)


def combine(rows: Array, bounds: Array, order: Array, token: Array, weight: Array,
            num_tokens: int, tiles: CombineTiles, interpret, compiler_params=None) -> Array:
  """y [num_tokens, D] (both multiples of their tiles) from rows [R, D].

  order, token, weight: the rows sorted by token (token[j] = row_index[order[j]]),
  padded with block_s entries; bounds [T/bt + 1]: where each token tile's run
  starts in the sorted order.
  """
  bt, bd = tiles.block_t, tiles.block_d
  exact = jnp.dtype(rows.dtype).itemsize >= 4
  kernel = functools.partial(_combine_kernel, tiles=tiles, exact=exact)
  operands = (bounds, order, token, weight, rows)
  return pl.pallas_call(
      kernel,
      out_shape=shape_like((num_tokens, rows.shape[1]), rows.dtype, rows),
      grid=(num_tokens // bt, rows.shape[1] // bd),
      in_specs=[_whole(a.shape) for a in operands],
      out_specs=pl.BlockSpec((bt, bd), lambda t, d: (t, d)),
      interpret=interpret, compiler_params=compiler_params,
      name="moejax_combine")(*operands)
