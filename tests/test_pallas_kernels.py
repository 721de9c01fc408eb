"""pallas_kernels against per-group references, in interpret mode on CPU.

Both targets run here: `triton` (the GPU kernels, with fused gather) and
`mosaic` (the TPU kernels, scalar-prefetched schedules). Tiles of 8 x 8 x 8 over
R = 40 rows, D = 13 and F = 9 put group boundaries inside tiles and make every
dimension ragged against its tile. Group sizes are fuzzed: random, zeros, one
group holding every row, and sums short of R.

Tolerances: float32 1e-5 (values) and 1e-4 (gradients), relative to the largest
reference entry; bfloat16 inputs 2e-2 (values) and 3e-2 (gradients), against a
float64 reference on the same rounded inputs (outputs are rounded to bf16, whose
spacing is 2^-8 = 0.4%, and gradients pass through one more bf16 rounding).
"""
from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import metadata

NUM_SRC, NUM_ROWS, NUM_GROUPS, NUM_LOCAL, DIM_K, DIM_N = 11, 40, 5, 3, 13, 9
TOL = {"float32": (1e-5, 1e-4), "bfloat16": (2e-2, 3e-2)}


def _settings(target: str) -> pk.KernelSettings:
  return pk.KernelSettings(target=target, interpret=True,
                           tiling=pk.GmmTiling.uniform(8, 8, 8),
                           combine_tiles=pk.CombineTiles(8, 8, 8))


def _group_sizes():
  """E sizes with sum <= R: random (capped in order), one group with all rows, or zeros."""
  def capped(sizes):
    out, left = [], NUM_ROWS
    for size in sizes:
      out.append(min(size, left))
      left -= out[-1]
    return out
  one = st.integers(0, NUM_GROUPS - 1).map(
      lambda g: [NUM_ROWS if e == g else 0 for e in range(NUM_GROUPS)])
  return st.one_of(st.lists(st.integers(0, 16), min_size=NUM_GROUPS, max_size=NUM_GROUPS)
                   .map(capped), one, st.just([0] * NUM_GROUPS))


def _close(got, want, tol, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
  err = float(np.max(np.abs(got - want), initial=0.0))
  assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


def _row_groups(sizes, offset=0, num_local=NUM_GROUPS):
  """Local group of each row, -1 for rows of other groups or past the groups."""
  group = np.full(NUM_ROWS, -1)
  start = np.concatenate([[0], np.cumsum(sizes)])
  for g in range(num_local):
    group[start[offset + g]:start[offset + g + 1]] = g
  return group


def _reference(rows, rhs, group, cot, transpose_rhs):
  """out[r] = rows[r] @ W[g(r)]; d rows[r] = cot[r] @ W[g(r)]^T; d W[g] = rows_g^T cot_g
  (d W^T when transposed), in float64 over the rows of local groups."""
  w = np.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
  out = np.zeros((rows.shape[0], w.shape[2]))
  d_rows = np.zeros(rows.shape)
  d_w = np.zeros(w.shape)
  for g in range(w.shape[0]):
    mine = group == g
    out[mine] = rows[mine] @ w[g]
    d_rows[mine] = cot[mine] @ w[g].T
    d_w[g] = rows[mine].T @ cot[mine]
  return out, d_rows, (np.swapaxes(d_w, 1, 2) if transpose_rhs else d_w)


@functools.lru_cache(maxsize=None)
def _gmm_with_grads(target, gathered, transpose_rhs):
  settings = _settings(target)

  def loss(lhs, rhs, cot, sizes, offset, row_index):
    out = pk.gmm(lhs, rhs, sizes, offset, row_index=row_index if gathered else None,
                 transpose_rhs=transpose_rhs, settings=settings)
    return jnp.sum(out.astype(jnp.float32) * cot), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


MODES = {  # name: (gathered, transpose_rhs, local groups)
    "plain": (False, False, False), "gather": (True, False, False),
    "transposed": (False, True, False), "local": (False, False, True),
}
CASES = [(mode, "float32") for mode in MODES] + [("gather", "bfloat16")]


GMM_DRAWS = dict(sizes=_group_sizes(), seed=st.integers(0, 2**31 - 1),
                 offset=st.integers(0, NUM_GROUPS - NUM_LOCAL))


@pytest.mark.parametrize("mode,dtype", CASES)
@hypothesis.given(**GMM_DRAWS)
def test_triton_gmm_matches_reference(mode, dtype, sizes, seed, offset):
  _check_gmm("triton", mode, dtype, sizes, seed, offset)


@pytest.mark.parametrize("mode,dtype", CASES)
# TPU interpret mode simulates every DMA: slow. Two thirds of the profile's examples.
@hypothesis.settings(max_examples=max(4, hypothesis.settings.default.max_examples * 2 // 3))
@hypothesis.given(**GMM_DRAWS)
def test_mosaic_gmm_matches_reference(mode, dtype, sizes, seed, offset):
  _check_gmm("mosaic", mode, dtype, sizes, seed, offset)


def _check_gmm(target, mode, dtype, sizes, seed, offset):
  """gmm values, d lhs and d rhs against _reference for one draw."""
  gathered, transpose_rhs, local = MODES[mode]
  num_local = NUM_LOCAL if local else NUM_GROUPS
  offset = offset if local else 0
  rng = np.random.default_rng(seed)
  rhs_shape = (num_local, DIM_N, DIM_K) if transpose_rhs else (num_local, DIM_K, DIM_N)
  rhs = jnp.asarray(rng.normal(size=rhs_shape) / np.sqrt(DIM_K), dtype)
  cot = jnp.asarray(rng.normal(size=(NUM_ROWS, DIM_N)), jnp.float32)
  group = _row_groups(sizes, offset, num_local)
  if gathered:   # indices outside [0, N) read zero rows
    lhs = jnp.asarray(rng.normal(size=(NUM_SRC, DIM_K)), dtype)
    row_index = jnp.asarray(rng.integers(-2, NUM_SRC + 2, NUM_ROWS), jnp.int32)
    inside = (np.asarray(row_index) >= 0) & (np.asarray(row_index) < NUM_SRC)
    lhs64 = np.asarray(lhs, np.float64)
    rows = np.where(inside[:, None], lhs64[np.clip(np.asarray(row_index), 0, NUM_SRC - 1)], 0)
  else:
    # Rows outside every local group hold NaN: the kernels must write zeros there
    # and keep them out of the weight gradient.
    lhs = np.asarray(rng.normal(size=(NUM_ROWS, DIM_K)))
    lhs[group < 0] = np.nan
    lhs = jnp.asarray(lhs, dtype)
    row_index = jnp.zeros((NUM_ROWS,), jnp.int32)
    rows = np.nan_to_num(np.asarray(lhs, np.float64), nan=0.0)

  (_, out), (d_lhs, d_rhs) = _gmm_with_grads(target, gathered, transpose_rhs)(
      lhs, rhs, cot, jnp.asarray(sizes, jnp.int32), jnp.asarray(offset, jnp.int32), row_index)
  want_out, want_d_rows, want_d_rhs = _reference(
      rows, np.asarray(rhs, np.float64), group, np.asarray(cot, np.float64), transpose_rhs)
  if gathered:   # d x[t] sums the d rows that read token t
    want_d_lhs = np.zeros((NUM_SRC, DIM_K))
    np.add.at(want_d_lhs, np.asarray(row_index)[inside], want_d_rows[inside])
  else:
    want_d_lhs = want_d_rows

  value_tol, grad_tol = TOL[dtype]
  assert out.dtype == jnp.dtype(dtype) and d_rhs.dtype == jnp.dtype(dtype)
  _close(out, want_out, value_tol, "out")
  assert np.all(np.asarray(out, np.float32)[group < 0] == 0), "rows outside the groups"
  _close(d_lhs, want_d_lhs, grad_tol, "d lhs")
  _close(d_rhs, want_d_rhs, grad_tol, "d rhs")
  empty = np.array([np.sum(group == g) == 0 for g in range(num_local)])
  assert np.all(np.asarray(d_rhs, np.float32)[empty] == 0), "empty groups' weight gradient"


@pytest.mark.parametrize("target", pk.TARGETS)
@hypothesis.given(sizes=_group_sizes(), seed=st.integers(0, 2**31 - 1),
                  offset=st.integers(0, NUM_GROUPS - NUM_LOCAL))
def test_tgmm_of_local_groups(target, sizes, seed, offset):
  """tgmm with a group offset and NUM_LOCAL groups, rows gathered by index."""
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.normal(size=(NUM_SRC, DIM_K)), jnp.float32)
  grad = jnp.asarray(rng.normal(size=(NUM_ROWS, DIM_N)), jnp.float32)
  row_index = jnp.asarray(rng.integers(0, NUM_SRC, NUM_ROWS), jnp.int32)
  got = _tgmm(target)(lhs, grad, jnp.asarray(sizes, jnp.int32), offset, row_index)
  rows = np.asarray(lhs, np.float64)[np.asarray(row_index)]
  group = _row_groups(sizes, offset, NUM_LOCAL)
  want = np.stack([rows[group == g].T @ np.asarray(grad, np.float64)[group == g]
                   for g in range(NUM_LOCAL)])
  _close(got, want, 1e-5, "tgmm")


@functools.lru_cache(maxsize=None)
def _tgmm(target):
  return jax.jit(lambda lhs, grad, sizes, offset, index: pk.tgmm(
      lhs, grad, sizes, offset, num_local=NUM_LOCAL, row_index=index,
      settings=_settings(target)))


@functools.lru_cache(maxsize=None)
def _combine_with_grads(target):
  def loss(rows, weight, row_index, cot):
    y = pk.combine(rows, row_index, weight, NUM_SRC, settings=_settings(target))
    return jnp.sum(y.astype(jnp.float32) * cot), y
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("target", pk.TARGETS)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), fan_in=st.sampled_from([1, 4, NUM_ROWS]))
def test_combine_matches_reference(target, dtype, seed, fan_in):
  """y[t] = sum_{r -> t} w_r rows_r for any number of rows per token (fan_in bounds
  the distinct tokens: 1 puts every row on one token); indices outside [0, T) drop."""
  rng = np.random.default_rng(seed)
  rows = jnp.asarray(rng.normal(size=(NUM_ROWS, DIM_K)), dtype)
  weight = jnp.asarray(rng.uniform(0.1, 1.0, NUM_ROWS), jnp.float32)
  tokens = rng.choice(np.arange(-1, NUM_SRC + 1), size=max(1, NUM_SRC // fan_in))
  row_index = jnp.asarray(rng.choice(tokens, NUM_ROWS), jnp.int32)
  cot = jnp.asarray(rng.normal(size=(NUM_SRC, DIM_K)), jnp.float32)
  (_, y), (d_rows, d_weight) = _combine_with_grads(target)(rows, weight, row_index, cot)

  index = np.asarray(row_index)
  inside = (index >= 0) & (index < NUM_SRC)
  rows64, w64, cot64 = (np.asarray(a, np.float64) for a in (rows, weight, cot))
  want = np.zeros((NUM_SRC, DIM_K))
  np.add.at(want, index[inside], w64[inside, None] * rows64[inside])
  dy = np.where(inside[:, None], cot64[np.clip(index, 0, NUM_SRC - 1)], 0)
  value_tol, grad_tol = TOL[dtype]
  _close(y, want, value_tol, "combine")
  _close(d_rows, dy * w64[:, None], grad_tol, "d rows")
  _close(d_weight, np.sum(dy * rows64, axis=1), grad_tol, "d weight")


def test_gmm_by_hand():
  """Two groups, sizes [2, 1] of R = 4 rows; W_0 = I, W_1 = 2 I (2 x 2).

  lhs rows [1, 2], [3, 4] (group 0), [5, 6] (group 1), [7, 8] (no group):
  out = [1, 2], [3, 4], [10, 12], [0, 0]. With row_index [3, 0, 1, 2] rows read
  lhs[3], lhs[0], lhs[1], lhs[2]: [7, 8], [1, 2], [6, 8], [0, 0].
  """
  lhs = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
  rhs = jnp.stack([jnp.eye(2), 2 * jnp.eye(2)])
  sizes = jnp.array([2, 1])
  for target in pk.TARGETS:
    settings = _settings(target)
    np.testing.assert_allclose(pk.gmm(lhs, rhs, sizes, settings=settings),
                               [[1, 2], [3, 4], [10, 12], [0, 0]])
    np.testing.assert_allclose(
        pk.gmm(lhs, rhs, sizes, row_index=jnp.array([3, 0, 1, 2]), settings=settings),
        [[7, 8], [1, 2], [6, 8], [0, 0]])


def test_combine_by_hand():
  """rows [1, 1], [2, 2], [4, 4] with weights .5, 1, .25 into tokens 1, 1, 0:
  y0 = .25*[4, 4] = [1, 1]; y1 = .5*[1, 1] + [2, 2] = [2.5, 2.5]; y2 = 0."""
  rows = jnp.array([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]])
  y = pk.combine(rows, jnp.array([1, 1, 0]), jnp.array([0.5, 1.0, 0.25]), 3,
                 settings=_settings("triton"))
  np.testing.assert_allclose(y, [[1, 1], [2.5, 2.5], [0, 0]])


def test_group_tiles_by_hand():
  """Sizes [3, 0, 5, 8] over R = 24 rows in tiles of 4: rows [0,3) [3,3) [3,8) [8,16).

  Group 0 visits tile 0; empty group 1 visits tile 3 // 4 = 0; group 2 tiles 0 and
  1; group 3 tiles 2 and 3; tiles 4 and 5 (rows 16..23) have no visit. V = 6 + 4
  = 10 slots, 6 active; inactive ones repeat the last visit.
  """
  schedule = metadata.group_tiles(jnp.array([3, 0, 5, 8]), 24, 4)
  np.testing.assert_array_equal(schedule.group_start, [0, 3, 3, 8, 16])
  np.testing.assert_array_equal(schedule.visit_group, [0, 1, 2, 2, 3, 3, 3, 3, 3, 3])
  np.testing.assert_array_equal(schedule.visit_tile, [0, 0, 0, 1, 2, 3, 3, 3, 3, 3])
  np.testing.assert_array_equal(schedule.visit_active, [1] * 6 + [0] * 4)
  np.testing.assert_array_equal(schedule.visit_first, [1, 0, 0, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(schedule.visit_group_first, [1, 1, 1, 0, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(schedule.visit_group_last, [1, 1, 0, 1, 0, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(schedule.tile_visits, [0, 3, 4, 5, 6, 6, 6])
  np.testing.assert_array_equal(schedule.group_visits, [0, 1, 2, 4, 6])
  # Local groups 1..2 (offset 1): rows keep the global layout.
  local = metadata.group_tiles(jnp.array([3, 0, 5, 8]), 24, 4, group_offset=1, num_local=2)
  np.testing.assert_array_equal(local.group_start, [3, 3, 8])
  np.testing.assert_array_equal(local.group_visits, [0, 1, 3])
  # Local groups past E are empty rather than clamped onto earlier groups:
  # offset 3 of 4 groups, 3 local -> group 3 [8, 16), then two empty groups at 16.
  past = metadata.group_tiles(jnp.array([3, 0, 5, 8]), 24, 4, group_offset=3, num_local=3)
  np.testing.assert_array_equal(past.group_start, [8, 16, 16, 16])


@hypothesis.given(sizes=_group_sizes(), block_m=st.sampled_from([1, 4, 8]))
def test_group_tiles_cover_each_group_row_once(sizes, block_m):
  """Every row of every group lies in exactly one visit of its group, visits fit
  in V = Mt + G, and tiles never decrease along the visits."""
  num_rows = NUM_ROWS
  schedule = metadata.group_tiles(jnp.array(sizes), num_rows, block_m)
  active = np.asarray(schedule.visit_active) == 1
  groups = np.asarray(schedule.visit_group)[active]
  tiles = np.asarray(schedule.visit_tile)[active]
  assert np.all(np.diff(tiles) >= 0)
  start = np.concatenate([[0], np.cumsum(sizes)])
  for g, size in enumerate(sizes):
    covered = np.concatenate([np.arange(t * block_m, (t + 1) * block_m)
                              for t in tiles[groups == g]])
    in_group = covered[(covered >= start[g]) & (covered < start[g + 1])]
    np.testing.assert_array_equal(np.sort(in_group), np.arange(start[g], start[g + 1]))
    assert np.sum(groups == g) >= 1


def test_bad_settings_name_the_field():
  with pytest.raises(ValueError, match="target"):
    pk.KernelSettings(target="cuda")
  with pytest.raises(ValueError, match="block_m"):
    pk.Tiles(block_m=0)
  with pytest.raises(TypeError, match="tiling.forward"):
    pk.GmmTiling(forward=(8, 8, 8))
  with pytest.raises(TypeError, match="tiling"):
    pk.KernelSettings(tiling=pk.Tiles())
  with pytest.raises(ValueError, match="block_t"):
    pk.CombineTiles(block_t=-1)
  # Compiled Triton kernels need power-of-two tiles; interpret mode takes any.
  odd = pk.GmmTiling(forward=pk.Tiles(64, 48, 128))
  with pytest.raises(ValueError, match="tiling.forward.block_k"):
    pk.KernelSettings(target="triton", tiling=odd, interpret=False).resolved()
  assert pk.KernelSettings(target="triton", tiling=odd, interpret=True).resolved().tiling == odd


def test_bad_shapes_are_refused():
  lhs, rhs, sizes = jnp.zeros((4, 3)), jnp.zeros((2, 5, 6)), jnp.array([2, 2])
  with pytest.raises(ValueError, match="K = 3"):
    pk.gmm(lhs, rhs, sizes)
  with pytest.raises(ValueError, match="group_sizes"):
    pk.gmm(lhs, jnp.zeros((3, 3, 6)), sizes)
  with pytest.raises(ValueError, match="row_index"):
    pk.combine(jnp.zeros((4, 3)), jnp.zeros((5,), jnp.int32), jnp.zeros((4,)), 2)
  with pytest.raises(ValueError, match="num_tokens"):
    pk.combine(jnp.zeros((4, 3)), jnp.zeros((4,), jnp.int32), jnp.zeros((4,)), 0)
