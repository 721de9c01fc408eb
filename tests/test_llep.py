"""Least-Loaded Expert Parallelism: the spill plan by hand and fuzzed, and LLEP
execution equal to plain expert parallelism with a bounded device load."""
from __future__ import annotations

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moejax import dispatch
from moejax.core import RoutingPlan
from moejax.parallel import ExpertParallel, expert_parallel_apply, make_mesh
from moejax.parallel.llep import least_loaded_plan
from tests.helpers import assert_trees_close, random_ffn


def _plan(counts, n, threshold=1.3, alpha=1.0, min_chunk=1, guest_slots=2):
  plan = least_loaded_plan(jnp.asarray(counts, jnp.int32), n, threshold=threshold,
                           alpha=alpha, min_chunk=min_chunk, guest_slots=guest_slots)
  return jax.tree.map(np.asarray, plan)


def test_spill_plan_by_hand():
  # n = 4 devices, 2 experts each. Loads: d0 = 16+2, d1 = 4, d2 = 4, d3 = 6; M = 32/4 = 8;
  # 18 > 1.3 * 8: spill, cap = 8. Experts by count: e0 (16), e7 (4), e1..e6 (2 each).
  # e0: 8 home, 8 to d1 (least loaded).      loads [8, 8, 0, 0]
  # e7: 4 home (d3).                          [8, 8, 0, 4]
  # e1: d0 full -> d2.  e2: d1 full -> d2.    [8, 8, 4, 4]
  # e3: d1 full, d2 has no guest slot -> d3.  [8, 8, 4, 6]
  # e4, e5 home (d2), e6 home (d3).           [8, 8, 8, 8]
  plan = _plan([16, 2, 2, 2, 2, 2, 2, 4], 4)
  assert bool(plan.triggered)
  np.testing.assert_array_equal(plan.device_load, [8, 8, 8, 8])
  np.testing.assert_array_equal(plan.guest_expert, [[-1, -1], [0, -1], [1, 2], [3, -1]])
  np.testing.assert_array_equal(plan.piece_rows[0], [8, 8, 0, 0])
  np.testing.assert_array_equal(plan.piece_device[0, :2], [0, 1])
  np.testing.assert_array_equal(plan.piece_slot[0, :2], [0, 2])      # d1: E_l + guest slot 0
  np.testing.assert_array_equal(plan.piece_rows[:, 0], [8, 0, 0, 0, 2, 2, 2, 4])


def test_no_spill_below_threshold():
  # loads [6, 4, 4, 6], M = 5: 6 <= 1.3 * 5, so every expert stays home.
  plan = _plan([3, 3, 2, 2, 2, 2, 3, 3], 4)
  assert not bool(plan.triggered)
  np.testing.assert_array_equal(plan.device_load, [6, 4, 4, 6])
  assert np.all(plan.guest_expert == -1)


@hypothesis.given(
    n=st.sampled_from([2, 4, 8]), local=st.sampled_from([1, 2, 4]),
    alpha=st.floats(1.0, 2.0), min_chunk=st.integers(1, 4),
    data=st.data())
def test_spill_plan_invariants(n, local, alpha, min_chunk, data):
  num_experts = n * local
  counts = np.asarray(data.draw(st.lists(st.integers(0, 60), min_size=num_experts,
                                         max_size=num_experts)))
  hypothesis.assume(counts.sum() > 0)
  plan = _plan(counts, n, alpha=alpha, min_chunk=min_chunk, guest_slots=num_experts)
  home = np.arange(num_experts) // local
  np.testing.assert_array_equal(plan.piece_rows.sum(1), counts)          # nothing lost
  load = np.zeros(n, int)
  np.add.at(load, plan.piece_device.reshape(-1), plan.piece_rows.reshape(-1))
  np.testing.assert_array_equal(load, plan.device_load)
  away = (plan.piece_device != home[:, None]) & (plan.piece_rows > 0)
  assert np.all(plan.piece_rows[away] >= min_chunk)                       # chunks >= m
  if not plan.triggered:
    assert not away.any()
  elif min_chunk == 1:                                                    # the bound
    assert load.max() <= math.ceil(np.float32(alpha) * np.float32(counts.sum() / n))


T, D, F, E, K = 64, 8, 6, 8, 2


def _skewed(seed=0):
  """Half the tokens choose expert 0 first: it gets 50% of the tokens."""
  rng = np.random.default_rng(seed)
  experts = []
  for t in range(T):
    if t % 2 == 0:
      experts.append([0, rng.integers(1, E)])
    else:
      experts.append(rng.choice(np.arange(1, E), size=K, replace=False))
  x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
  weights = jnp.asarray(rng.uniform(0.1, 1.0, size=(T, K)), jnp.float32)
  return x, jnp.asarray(np.asarray(experts), jnp.int32), weights, random_ffn(rng, E, D, F, glu=True)


def _run(settings):
  engine = dispatch.create("sorted", block_size=8)

  def device(x, experts, weights, ffn):
    y, stats = expert_parallel_apply(x, RoutingPlan.from_topk(experts, weights), ffn,
                                     engine, settings)
    me = jax.nn.one_hot(jax.lax.axis_index("expert"), 8)
    return y, jax.lax.psum(me * stats.rows, "expert"), jax.lax.psum(stats.spilled, "expert")

  mesh = make_mesh(1, 8, 1)
  return jax.shard_map(device, mesh=mesh, in_specs=(P("expert"),) * 3 + (P("expert"),),
                       out_specs=(P("expert"), P(), P()))


def test_llep_bounds_device_load_and_equals_plain_ep():
  x, experts, weights, ffn = _skewed()
  plain = _run(ExpertParallel(transport="fixed"))
  balanced = _run(ExpertParallel(transport="fixed", llep=True, llep_alpha=1.0))
  y_plain, rows_plain, _ = jax.jit(plain)(x, experts, weights, ffn)
  y_llep, rows_llep, spilled = jax.jit(balanced)(x, experts, weights, ffn)
  mean = T * K / 8                                                        # 16 rows
  assert float(rows_plain.max()) == T / 2                                 # expert 0: 32 rows
  assert float(rows_llep.max()) <= 1.0 * mean
  assert float(rows_llep.sum()) == T * K and float(spilled) >= T / 2 - mean   # e0 alone: 16
  np.testing.assert_allclose(y_llep, y_plain, rtol=1e-5, atol=1e-5)

  def objective(run):
    def loss(x, weights, ffn):
      return jnp.sum(jnp.sin(run(x, experts, weights, ffn)[0]))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  assert_trees_close(objective(balanced)(x, weights, ffn), objective(plain)(x, weights, ffn),
                     rtol=1e-4, atol=1e-5, what="LLEP gradients")
