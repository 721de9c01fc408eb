"""Grouped-matmul backends against a per-row reference, values and gradients.

Group sizes are fuzzed: empty groups, one group holding every row, sizes that are
not multiples of the tile, odd D and F.
"""
from __future__ import annotations

import functools
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from moejax import grouping
from moejax.dispatch import gmm as gmm_backends
from moejax.dispatch import gmm_xla
from tests.helpers import assert_trees_close

NUM_TOKENS, MODEL_DIM, HIDDEN_DIM, NUM_EXPERTS, NUM_SLOTS = 10, 7, 5, 4, 24
BACKENDS = {"xla-4": gmm_backends.create("xla", 4), "xla-3": gmm_backends.create("xla", 3),
            "ragged_dot": gmm_backends.create("ragged_dot"),
            "pallas": gmm_backends.create("pallas", kernel_settings=pallas_kernels.KernelSettings(
                tiling=pallas_kernels.GmmTiling.uniform(8, 8, 8),
                combine_tiles=pallas_kernels.CombineTiles(8, 8, 8)))}


def _layout(expert, valid, multiple, token, weight):
  dest, padded_sizes, num_rows = grouping.padded_layout(expert, valid, NUM_EXPERTS, multiple)
  row_index = jnp.full((num_rows,), NUM_TOKENS, jnp.int32).at[dest].set(token, mode="drop")
  row_weight = jnp.zeros((num_rows,)).at[dest].set(weight, mode="drop")
  row_group = jnp.full((num_rows,), -1, jnp.int32).at[dest].set(expert, mode="drop")
  return row_index, row_weight, row_group, padded_sizes


def _reference(x, rhs_in, rhs_out, row_index, row_weight, row_group):
  """Row by row: h_r = x[i_r] @ W_in[g_r]; y[i_r] += w_r * h_r @ W_out[g_r]."""
  live = row_group >= 0
  group = jnp.where(live, row_group, 0)
  rows = jnp.where(live[:, None], x.at[row_index].get(mode="fill", fill_value=0), 0)
  h = jnp.einsum("rd,rdf->rf", rows, rhs_in[group]) * live[:, None]
  out = jnp.einsum("rf,rfd->rd", h, rhs_out[group]) * (row_weight * live)[:, None]
  return h, jax.ops.segment_sum(out, row_index, num_segments=x.shape[0])


def _sizes_strategy():
  # Either fully random experts, or everything on one expert.
  return st.one_of(
      st.lists(st.integers(0, NUM_EXPERTS - 1), min_size=NUM_SLOTS, max_size=NUM_SLOTS),
      st.integers(0, NUM_EXPERTS - 1).map(lambda e: [e] * NUM_SLOTS))


def _scalar(h, y):
  return jnp.sum(jnp.cos(h)) + jnp.sum(y * jnp.arange(MODEL_DIM))


@functools.lru_cache(maxsize=None)
def _values_and_grads(backend_name):
  """Jitted (h, y) and gradients in (x, W_in, W_out, row_weight), ours and reference."""
  backend = BACKENDS.get(backend_name)

  def ours(x, rhs_in, rhs_out, row_weight, row_index, row_group, padded_sizes):
    h = backend.gather_gmm(x, row_index, rhs_in, padded_sizes)
    y = backend.gmm_scatter(h, rhs_out, padded_sizes, row_index, row_weight, NUM_TOKENS)
    return h, y

  def theirs(x, rhs_in, rhs_out, row_weight, row_index, row_group, padded_sizes):
    return _reference(x, rhs_in, rhs_out, row_index, row_weight, row_group)

  fn = theirs if backend is None else ours
  grad = jax.grad(lambda *a: _scalar(*fn(*a)), argnums=(0, 1, 2, 3))
  return jax.jit(lambda *a: (fn(*a), grad(*a)))


@pytest.mark.parametrize("backend_name", list(BACKENDS))
@hypothesis.given(experts=_sizes_strategy(), seed=st.integers(0, 2**31 - 1),
                  invalid=st.sampled_from([0.0, 0.4]))
def test_backend_matches_reference(backend_name, experts, seed, invalid):
  backend = BACKENDS[backend_name]
  rng = np.random.default_rng(seed)
  expert = jnp.asarray(experts, jnp.int32)
  valid = jnp.asarray(rng.uniform(size=NUM_SLOTS) >= invalid)
  token = jnp.asarray(rng.integers(0, NUM_TOKENS, NUM_SLOTS), jnp.int32)
  weight = jnp.asarray(rng.uniform(0.1, 1.0, NUM_SLOTS), jnp.float32)
  x = jnp.asarray(rng.normal(size=(NUM_TOKENS, MODEL_DIM)), jnp.float32)
  rhs_in = jnp.asarray(rng.normal(size=(NUM_EXPERTS, MODEL_DIM, HIDDEN_DIM)), jnp.float32)
  rhs_out = jnp.asarray(rng.normal(size=(NUM_EXPERTS, HIDDEN_DIM, MODEL_DIM)), jnp.float32)
  row_index, row_weight, row_group, padded_sizes = _layout(
      expert, valid, backend.row_multiple, token, weight)
  args = (x, rhs_in, rhs_out, row_weight, row_index, row_group, padded_sizes)

  (got_h, got_y), got_grads = _values_and_grads(backend_name)(*args)
  (want_h, want_y), want_grads = _values_and_grads("reference")(*args)
  np.testing.assert_allclose(got_h, want_h, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  # Padding rows and rows past the groups are zeros.
  assert np.all(np.asarray(got_h)[np.asarray(row_group) < 0] == 0)
  assert_trees_close(got_grads, want_grads, rtol=1e-4, atol=1e-4, what=backend_name)
  # Experts with no rows get zero weight gradients.
  empty = np.asarray(padded_sizes) == 0
  assert np.all(np.asarray(got_grads[1])[empty] == 0)
  assert np.all(np.asarray(got_grads[2])[empty] == 0)


def test_padded_layout_by_hand():
  """Slots (expert, valid) = (1,T) (0,T) (1,T) (2,F) (1,T), E=3, multiple 2.

  counts [1, 3, 0] -> padded [2, 4, 0]; starts [0, 2, 6]; R = 5 + 3*1 = 8.
  Expert 0's slot 1 -> row 0; expert 1's slots 0, 2, 4 -> rows 2, 3, 4;
  invalid slot 3 -> R = 8.
  """
  expert = jnp.array([1, 0, 1, 2, 1])
  valid = jnp.array([True, True, True, False, True])
  dest, padded, num_rows = grouping.padded_layout(expert, valid, 3, 2)
  assert num_rows == 8
  np.testing.assert_array_equal(padded, [2, 4, 0])
  np.testing.assert_array_equal(dest, [2, 0, 3, 8, 4])


def test_fused_ops_by_hand():
  """Two groups of one tile (2 rows) each; W_in = (I, 2I), W_out = (I, I).

  x = [[1, 2], [3, 4]]; row_index = [0, 2, 1, 0] (2 is outside x: a zero row).
  gather_gmm: [[1, 2], [0, 0], 2*[3, 4], 2*[1, 2]] = [[1, 2], [0, 0], [6, 8], [2, 4]].
  gmm_scatter with weights [1, 0, .5, .25]:
    y0 = 1*[1, 2] + .25*[2, 4] = [1.5, 3];  y1 = .5*[6, 8] = [3, 4].
  """
  x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  eye = jnp.eye(2)
  row_index = jnp.array([0, 2, 1, 0], jnp.int32)
  padded = jnp.array([2, 2], jnp.int32)
  h = gmm_xla.gather_gmm(x, row_index, jnp.stack([eye, 2 * eye]), padded, 2)
  np.testing.assert_allclose(h, [[1, 2], [0, 0], [6, 8], [2, 4]])
  y = gmm_xla.gmm_scatter(h, jnp.stack([eye, eye]), padded, row_index,
                          jnp.array([1.0, 0.0, 0.5, 0.25]), 2, 2)
  np.testing.assert_allclose(y, [[1.5, 3.0], [3.0, 4.0]])


def test_bfloat16_accumulates_in_float32():
  """bf16 inputs, f32 accumulation: within bf16 output rounding of the f32 result."""
  rng = np.random.default_rng(1)
  num_rows, dim, hidden = 64, 96, 80
  x = jnp.asarray(rng.normal(size=(num_rows, dim)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(2, dim, hidden)) / np.sqrt(dim), jnp.float32)
  row_index = jnp.arange(num_rows, dtype=jnp.int32)
  padded = jnp.array([32, 32], jnp.int32)
  want = gmm_xla.gather_gmm(x, row_index, rhs, padded, 16)
  got = gmm_xla.gather_gmm(x.astype(jnp.bfloat16), row_index, rhs.astype(jnp.bfloat16),
                           padded, 16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=3e-2)


def test_auto_backend_follows_the_checked_table(monkeypatch):
  """`auto` (the layer's default) resolves by platform through AUTO_BACKEND (held to
  the device-check results by tests/test_device_check.py); named backends stay."""
  assert gmm_backends.resolve("auto") == "xla"          # this suite runs on CPU
  assert isinstance(gmm_backends.create("auto", 16), gmm_backends.XlaBackend)
  monkeypatch.setitem(gmm_backends.AUTO_BACKEND, "gpu", "pallas")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert gmm_backends.resolve("auto") == "pallas"
  assert isinstance(gmm_backends.create("auto"), gmm_backends.PallasBackend)
  monkeypatch.setattr(jax, "default_backend", lambda: "rocm_or_other")
  assert gmm_backends.resolve("auto") == "xla"           # a platform not in the table
  assert gmm_backends.resolve("xla") == "xla"
  with pytest.raises(ValueError, match="backend"):
    gmm_backends.create("triton")
