"""Which row tiles each group touches: the schedule of a grouped matmul.

Rows [0, M) are split into tiles of `block_m` rows; group g (of the local
groups) owns rows [start_g, end_g). A *visit* is one (group, tile) pair whose
rows overlap; a tile that straddles a group boundary is visited once per group,
and its rows are masked to the visiting group. Visits are ordered by group, then
tile, so tile indices never decrease along them.

  nonempty group g   visits tiles start_g // bm ... (end_g - 1) // bm
  empty group g      one visit of tile min(start_g // bm, Mt - 1), all rows masked
                     (so the weight-gradient pass still writes its zeros)

The number of visits is at most Mt + G: boundaries shared by consecutive groups
add at most one visit per group. Arrays have that static length; visits past
`num_visits` repeat the last one and are marked inactive.

With `group_offset` and `num_local`, the groups are group_sizes[offset :
offset + num_local] (expert parallelism: rhs holds only the local experts),
while rows keep the global layout, so rows of other groups belong to no local
group. Rows past the last local group belong to none either, and local groups
past E (offset + num_local > E) are empty.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.rows import exclusive_cumsum

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupTiles:
  """Schedule of a grouped matmul over G local groups and Mt row tiles.

  Attributes:
    group_start: int32[G + 1], first row of each local group; the last entry is
      the end of the last group.
    visit_group: int32[V], local group of each visit (V = Mt + G).
    visit_tile: int32[V], row tile of each visit.
    visit_active: int32[V], 1 for the first num_visits visits, else 0.
    visit_first: int32[V], 1 where the visit is the first of its row tile.
    visit_group_first: int32[V], 1 where the visit is the first of its group.
    visit_group_last: int32[V], 1 where the visit is the last of its group.
    tile_visits: int32[Mt + 1], first visit of each row tile (tiles that no
      group touches own an empty range).
    group_visits: int32[G + 1], first visit of each local group.
  """

  group_start: Array
  visit_group: Array
  visit_tile: Array
  visit_active: Array
  visit_first: Array
  visit_group_first: Array
  visit_group_last: Array
  tile_visits: Array
  group_visits: Array

  @property
  def num_groups(self) -> int:
    return self.group_start.shape[0] - 1

  @property
  def max_visits(self) -> int:
    return self.visit_group.shape[0]


def local_group_start(group_sizes: Array, group_offset, num_local: int) -> Array:
  """First row of each of the local groups and the end of the last: int32[G + 1]."""
  sizes = group_sizes.astype(jnp.int32)
  # Groups past the last one are empty: an offset with offset + G > E reads no
  # rows there instead of being clamped onto other groups.
  total = jnp.sum(sizes, keepdims=True)
  bounds = jnp.concatenate([exclusive_cumsum(sizes), jnp.repeat(total, num_local + 1)])
  offset = jnp.clip(jnp.asarray(group_offset, jnp.int32), 0, sizes.shape[0])
  return jax.lax.dynamic_slice_in_dim(bounds, offset, num_local + 1)


def group_tiles(group_sizes: Array, num_rows: int, block_m: int, group_offset=0,
                num_local: int | None = None) -> GroupTiles:
  """The visit schedule of rows [0, num_rows) in tiles of block_m (a divisor)."""
  if num_rows % block_m:
    raise ValueError(f"num_rows {num_rows} is not a multiple of block_m {block_m}")
  num_local = group_sizes.shape[0] if num_local is None else num_local
  num_tiles = num_rows // block_m
  start = jnp.minimum(local_group_start(group_sizes, group_offset, num_local), num_rows)
  lo, hi = start[:-1], start[1:]
  first_tile = jnp.minimum(lo // block_m, num_tiles - 1)
  last_tile = jnp.where(hi > lo, (hi - 1) // block_m, first_tile)
  count = last_tile - first_tile + 1                                   # >= 1
  group_visits = jnp.concatenate([exclusive_cumsum(count), jnp.sum(count, keepdims=True)])
  num_visits = group_visits[-1]

  max_visits = num_tiles + num_local
  visit = jnp.minimum(jnp.arange(max_visits, dtype=jnp.int32), num_visits - 1)
  group = jnp.searchsorted(group_visits[1:], visit, side="right").astype(jnp.int32)
  tile = (first_tile[group] + visit - group_visits[group]).astype(jnp.int32)
  active = jnp.arange(max_visits) < num_visits
  as_int = lambda b: b.astype(jnp.int32)
  has_next = jnp.arange(max_visits) + 1 < num_visits

  def first_and_last(values):
    previous = jnp.concatenate([jnp.full((1,), -1, jnp.int32), values[:-1]])
    following = jnp.concatenate([values[1:], jnp.full((1,), -1, jnp.int32)])
    following = jnp.where(has_next, following, -1)
    return as_int(active & (values != previous)), as_int(active & (values != following))

  tile_visits = jnp.searchsorted(jnp.where(active, tile, num_tiles),
                                 jnp.arange(num_tiles + 1), side="left").astype(jnp.int32)
  tile_first, _ = first_and_last(tile)
  group_first, group_last = first_and_last(group)
  return GroupTiles(
      group_start=start.astype(jnp.int32), visit_group=group, visit_tile=tile,
      visit_active=as_int(active), visit_first=tile_first,
      visit_group_first=group_first, visit_group_last=group_last, tile_visits=tile_visits,
      group_visits=group_visits.astype(jnp.int32))
