"""Expert capacity and drop policies (moejax/capacity.py).

C = ceil(cf * T * K / E), at least 1. apply_capacity keeps at most C valid
assignments per expert; `position` keeps earlier tokens first and `score` tokens
with the highest top-1 probability first, in both cases every first choice
before any second choice.
"""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import capacity
from moejax.core import RoutingPlan


@pytest.mark.parametrize("tokens,k,experts,factor,expected", [
    (10, 2, 4, 1.0, 5),       # ceil(1.0 * 10 * 2 / 4) = ceil(5)      = 5
    (10, 2, 4, 1.25, 7),      # ceil(1.25 * 10 * 2 / 4) = ceil(6.25)  = 7
    (7, 2, 4, 1.0, 4),        # ceil(14 / 4) = ceil(3.5)               = 4
    (12, 1, 8, 2.0, 3),       # ceil(2 * 12 / 8) = ceil(3)             = 3
    (16, 2, 4, 0.25, 2),      # ceil(.25 * 32 / 4) = ceil(2)           = 2
    (3, 1, 8, 0.5, 1),        # ceil(.5 * 3 / 8) = ceil(.1875)         = 1
    (1, 1, 64, 0.01, 1),      # ceil(.01 / 64) = 1, and never below 1
    (4096, 2, 64, 1.5, 192),  # 1.5 * 8192 / 64 = 192 exactly
    (200, 2, 8, 1.1, 55),     # 1.1 * 400 / 8 = 55; float64 gives 55.000000000000007
    (50, 1, 1, 1.1, 55),      # 1.1 * 50 = 55; float64 gives 55.000000000000007
])
def test_capacity_formula(tokens, k, experts, factor, expected):
  assert capacity.capacity(tokens, k, experts, factor) == expected


@hypothesis.given(tokens=st.integers(1, 4096), k=st.integers(1, 8),
                  experts=st.sampled_from([1, 2, 4, 8, 16, 64]),
                  factor=st.sampled_from([0.125, 0.25, 0.5, 1.0, 1.25, 1.5, 2.0, 4.0]))
def test_capacity_formula_fuzzed(tokens, k, experts, factor):
  # Dyadic factors and power-of-two E keep cf * T * K / E exact in floating
  # point, so the integer arithmetic below is the formula itself.
  numerator = int(factor * 8) * tokens * k          # 8 cf T K, an integer
  expected = max(1, -(-numerator // (8 * experts)))  # ceil(8 cf T K / (8 E))
  assert capacity.capacity(tokens, k, experts, factor) == expected


@pytest.mark.parametrize("factor", [0.0, -1.0])
def test_capacity_rejects_non_positive_factor(factor):
  with pytest.raises(ValueError, match="capacity_factor"):
    capacity.capacity(8, 2, 4, factor)


def _plan(experts, weights=None, valid=None):
  experts = jnp.asarray(experts, jnp.int32)
  if weights is None:
    weights = jnp.full(experts.shape, 0.5, jnp.float32)
  return RoutingPlan.from_topk(experts, jnp.asarray(weights, jnp.float32),
                               None if valid is None else jnp.asarray(valid))


def test_position_keeps_earlier_tokens_and_first_choices_first():
  # T = 4, E = 2, K = 2, C = 2.    slot: 0  1 | 2  3 | 4  5 | 6  7
  #   experts [[0, 1], [0, 1], [1, 0], [0, 1]]
  # expert 0: first choices t0, t1, t3 (slots 0, 2, 6), second choice t2 (slot 5)
  #           -> keeps t0, t1; drops t3 (later token) and t2's second choice.
  # expert 1: first choice t2 (slot 4), second choices t0, t1, t3 (slots 1, 3, 7)
  #           -> keeps t2's first choice, then t0's second choice; drops t1, t3.
  #           t2 beats t0 although t0 comes earlier: first choices go first.
  # dropped = 8 - 4 = 4, share 4 / 8 = .5
  weights = [[.6, .4], [.7, .3], [.8, .2], [.9, .1]]
  plan = _plan([[0, 1], [0, 1], [1, 0], [0, 1]], weights)
  probs = jnp.zeros((4, 2))
  kept, stats = capacity.apply_capacity(plan, probs, 2, 2, "position")
  np.testing.assert_array_equal(kept.valid, [1, 1, 1, 0, 1, 0, 0, 0])
  np.testing.assert_allclose(kept.weight, [.6, .4, .7, 0, .8, 0, 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(kept.token, plan.token)
  np.testing.assert_array_equal(kept.expert, plan.expert)
  assert float(stats["dropped"]) == 4.0
  assert float(stats["dropped_share"]) == 0.5


def test_score_keeps_highest_top1_probability():
  # T = 4, E = 2, K = 1, every token on expert 0, C = 2.
  #   top-1 probabilities: t0 .6, t1 .9, t2 .7, t3 .8
  #   score keeps t1 (.9) and t3 (.8); position would keep t0 and t1.
  probs = jnp.array([[.6, .4], [.9, .1], [.7, .3], [.8, .2]])
  plan = _plan([[0], [0], [0], [0]], [[.6], [.9], [.7], [.8]])
  kept, stats = capacity.apply_capacity(plan, probs, 2, 2, "score")
  np.testing.assert_array_equal(kept.valid, [0, 1, 0, 1])
  np.testing.assert_allclose(kept.weight, [0, .9, 0, .8], rtol=1e-6)
  assert float(stats["dropped"]) == 2.0 and float(stats["dropped_share"]) == 0.5
  kept, _ = capacity.apply_capacity(plan, probs, 2, 2, "position")
  np.testing.assert_array_equal(kept.valid, [1, 1, 0, 0])


def test_score_puts_first_choices_before_second_choices():
  # T = 3, E = 2, K = 2, C = 1.
  #   experts [[0, 1], [1, 0], [1, 0]], top-1 p: t0 .95, t1 .6, t2 .7
  # expert 1: first choices t1 (.6), t2 (.7); second choice t0 (.95)
  #           -> keeps t2 (best first choice), although t0 has the highest p.
  # expert 0: first choice t0 -> kept; second choices t1, t2 dropped.
  probs = jnp.array([[.95, .05], [.4, .6], [.3, .7]])
  plan = _plan([[0, 1], [1, 0], [1, 0]])
  kept, stats = capacity.apply_capacity(plan, probs, 2, 1, "score")
  np.testing.assert_array_equal(kept.valid, [1, 0, 0, 0, 1, 0])
  assert float(stats["dropped"]) == 4.0
  np.testing.assert_allclose(stats["dropped_share"], 4 / 6, rtol=1e-6)


def test_invalid_slots_stay_invalid_and_use_no_capacity():
  # T = 4, E = 2, K = 1, all on expert 0, C = 2; slot 0 (t0) already invalid
  # (e.g. a null expert). Expert 0 has 3 valid assignments: it keeps t1 and t2
  # and drops t3 only; slot 0 stays invalid and is not counted as dropped.
  # dropped = 3 - 2 = 1, share 1 / 3.
  plan = _plan([[0], [0], [0], [0]], valid=[[False], [True], [True], [True]])
  kept, stats = capacity.apply_capacity(plan, jnp.zeros((4, 2)), 2, 2, "position")
  np.testing.assert_array_equal(kept.valid, [0, 1, 1, 0])
  np.testing.assert_allclose(kept.weight, [0, .5, .5, 0])
  assert float(stats["dropped"]) == 1.0
  np.testing.assert_allclose(stats["dropped_share"], 1 / 3, rtol=1e-6)


def test_invalid_first_choice_promotes_second_choice():
  # A slot's choice rank counts the token's earlier *valid* slots
  # (grouping.choice_rank). T = 2, E = 2, K = 2, C = 1:
  #   t0: (e0 invalid, e1)   t1: (e1, e0)
  # expert 1: t0's e1 is its first valid choice (rank 0, token 0) and beats t1's
  #           first choice (rank 0, token 1); ranking by slot k instead would
  #           keep t1 (rank 0) over t0 (rank 1).
  # expert 0: only t1's second choice is valid -> kept.
  plan = _plan([[0, 1], [1, 0]], valid=[[False, True], [True, True]])
  kept, stats = capacity.apply_capacity(plan, jnp.zeros((2, 2)), 2, 1, "position")
  np.testing.assert_array_equal(kept.valid, [0, 1, 0, 1])
  assert float(stats["dropped"]) == 1.0


def test_nothing_dropped_when_capacity_suffices():
  plan = _plan([[0, 1], [1, 2], [2, 0]])
  kept, stats = capacity.apply_capacity(plan, jnp.zeros((3, 3)), 3, 2, "position")
  np.testing.assert_array_equal(kept.valid, plan.valid)
  np.testing.assert_array_equal(kept.weight, plan.weight)
  assert float(stats["dropped"]) == 0.0 and float(stats["dropped_share"]) == 0.0


def test_empty_plan_has_zero_dropped_share():
  plan = _plan([[0], [1]], valid=[[False], [False]])
  kept, stats = capacity.apply_capacity(plan, jnp.zeros((2, 2)), 2, 1, "position")
  assert not bool(jnp.any(kept.valid))
  assert float(stats["dropped"]) == 0.0 and float(stats["dropped_share"]) == 0.0


def _apply_capacity_numpy(experts, valid, probs, num_experts, cap, policy):
  """Reference: per expert, sort valid slots by (choice rank, token priority)."""
  num_tokens, k = experts.shape
  if policy == "position":
    token_priority = np.arange(num_tokens)
  else:
    order = np.argsort(-probs.max(axis=-1), kind="stable")
    token_priority = np.empty(num_tokens, int)
    token_priority[order] = np.arange(num_tokens)
  keep = np.zeros((num_tokens, k), bool)
  for e in range(num_experts):
    slots = [(int(valid[t, :j].sum()), token_priority[t], t, j)
             for t in range(num_tokens) for j in range(k)
             if valid[t, j] and experts[t, j] == e]
    for _, _, t, j in sorted(slots)[:cap]:
      keep[t, j] = True
  return keep


_APPLY = jax.jit(capacity.apply_capacity, static_argnums=(2, 4))

# Fuzzed shapes are fixed: T = 8, E = 4, K = 2.
FT, FE, FK = 8, 4, 2


@hypothesis.given(
    perms=st.lists(st.permutations(range(FE)), min_size=FT, max_size=FT),
    probs=st.lists(st.integers(0, 10), min_size=FT * FE, max_size=FT * FE),
    weights=st.lists(st.floats(0.0625, 1.0, width=32), min_size=FT * FK, max_size=FT * FK),
    valid=st.lists(st.booleans(), min_size=FT * FK, max_size=FT * FK),
    cap=st.integers(1, FT),
    policy=st.sampled_from(["position", "score"]))
def test_apply_capacity_fuzzed(perms, probs, weights, valid, cap, policy):
  experts = np.asarray(perms)[:, :FK]                 # distinct experts per token
  probs = np.asarray(probs, np.float32).reshape(FT, FE) / 10  # coarse: many ties
  weights = np.asarray(weights, np.float32).reshape(FT, FK)
  valid = np.asarray(valid).reshape(FT, FK)
  plan = RoutingPlan.from_topk(jnp.asarray(experts), jnp.asarray(weights), jnp.asarray(valid))
  kept, stats = _APPLY(plan, jnp.asarray(probs), FE, jnp.int32(cap), policy)
  kept_valid = np.asarray(kept.valid).reshape(FT, FK)

  # Never more than C valid assignments per expert, and min(count, C) kept.
  before = np.bincount(experts[valid], minlength=FE)
  after = np.bincount(experts[kept_valid], minlength=FE)
  assert np.all(after <= cap)
  np.testing.assert_array_equal(after, np.minimum(before, cap))
  # Invalid slots stay invalid; kept slots keep their weight, dropped ones get 0.
  assert not np.any(kept_valid & ~valid)
  np.testing.assert_array_equal(np.asarray(kept.weight).reshape(FT, FK),
                                np.where(kept_valid, weights, 0.0))
  np.testing.assert_array_equal(kept.token, plan.token)
  np.testing.assert_array_equal(kept.expert, plan.expert)
  # Exactly the slots the reference keeps.
  expected = _apply_capacity_numpy(experts, valid, probs, FE, cap, policy)
  np.testing.assert_array_equal(kept_valid, expected)
  # dropped = valid before - valid after, share = dropped / max(valid before, 1).
  dropped = int(valid.sum()) - int(expected.sum())
  assert float(stats["dropped"]) == dropped
  np.testing.assert_allclose(stats["dropped_share"], dropped / max(int(valid.sum()), 1),
                             rtol=1e-6)


# K = 1 score fuzz: T = 8, E = 3; distinct probabilities, each token on its argmax.
ST, SE = 8, 3


@hypothesis.given(perm=st.permutations(range(ST * SE)), cap=st.integers(1, ST))
def test_score_keeps_each_experts_highest_probability_tokens(perm, cap):
  probs = (np.asarray(perm, np.float32).reshape(ST, SE) + 1) / (ST * SE)
  experts = probs.argmax(axis=-1)[:, None]
  plan = RoutingPlan.from_topk(jnp.asarray(experts), jnp.asarray(probs.max(-1)[:, None]))
  kept, stats = _APPLY(plan, jnp.asarray(probs), SE, jnp.int32(cap), "score")
  kept_valid = np.asarray(kept.valid)
  for e in range(SE):
    mine = np.flatnonzero(experts[:, 0] == e)
    best = mine[np.argsort(-probs[mine, e])][:cap]
    assert set(np.flatnonzero(kept_valid & (experts[:, 0] == e))) == set(best.tolist())
  assert float(stats["dropped"]) == ST - kept_valid.sum()
  np.testing.assert_allclose(stats["dropped_share"], (ST - kept_valid.sum()) / ST, rtol=1e-6)
