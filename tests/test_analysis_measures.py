"""Routing measures of moejax.analysis on small literal traces, with the
arithmetic in comments, and fuzzed invariants against naive loop references."""
from __future__ import annotations

import math

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

import moejax.analysis as analysis
from moejax.analysis import trace as traces
from moejax.analysis.affinity import (coactivation, conditional_entropy, layer_affinity,
                                     shuffled_information)
from moejax.analysis.consistency import (
    bootstrap_interval, sch_curve, sch_interval, sch_knee, segment_cache_hit_rate,
    segment_routing_best_performance, segment_routing_best_performance_per_expert,
    srp_interval)
from moejax.analysis.diversity import distinct_combinations, distinct_paths
from moejax.analysis.drops import drop_rate_by_position, observed_drop_rate_by_position
from moejax.analysis.fluctuation import routing_fluctuation
from moejax.analysis.balance import (
    balance_over_checkpoints, expert_load, load_cv, max_violation, max_violation_interval)
from moejax.analysis.specialization import (
    _plug_in_mi, domain_expert_mutual_information, expert_specialisation, majority_expert_share,
    mutual_information,
    token_expert_mutual_information)

LN2, LN3 = math.log(2), math.log(3)


def make_trace(experts, num_experts, weights=None, kept=None, token_ids=None, positions=None,
               sequence_ids=None, domains=None, meta=None) -> traces.RoutingTrace:
  """A RoutingTrace from literal [T, K] (one layer) or [Y, T, K] expert lists.

  Defaults: one sequence in storage order, weights decreasing with the rank,
  everything selected kept, token ids 0..T-1, no domains.
  """
  experts = np.asarray(experts, np.int32)
  if experts.ndim == 2:
    experts = experts[None]
  _, t, k = experts.shape
  selected = experts >= 0
  if weights is None:
    weights = np.broadcast_to(np.arange(k, 0, -1, dtype=np.float32), experts.shape)
  weights = np.where(selected, np.broadcast_to(np.asarray(weights, np.float32), experts.shape), 0)
  kept = selected if kept is None else np.asarray(kept, bool).reshape(experts.shape) & selected
  sequence_ids = np.zeros(t, np.int32) if sequence_ids is None else np.asarray(sequence_ids)
  if positions is None:
    positions = np.zeros(t, np.int64)
    for seq in np.unique(sequence_ids):
      positions[sequence_ids == seq] = np.arange(np.sum(sequence_ids == seq))
  return traces.RoutingTrace(
      experts=experts, weights=weights.astype(np.float32), kept=kept,
      token_ids=np.asarray(np.arange(t) if token_ids is None else token_ids, np.int32),
      positions=np.asarray(positions, np.int32), sequence_ids=sequence_ids.astype(np.int32),
      domains=np.asarray(np.full(t, -1) if domains is None else domains, np.int32),
      num_experts=num_experts, meta={"dataset": "d", "split": "s", **(meta or {})})


# One sequence, 4 tokens, K = 2, E = 4: {0,1} {0,2} {0,1} {2,3}.
FOUR = make_trace([[0, 1], [0, 2], [0, 1], [2, 3]], 4)


# --- local routing consistency ---------------------------------------------------------

def test_sch_hand_computed():
  # s = 2: windows (t0,t1) n = [2,1,1,0], (t1,t2) n = [2,1,1,0], (t2,t3) n = [1,1,1,1];
  # each sums to K*s = 4.
  # m=1: (2/4 + 2/4 + 1/4) / 3 = 5/12;  m=2: (3/4 + 3/4 + 2/4) / 3 = 2/3;
  # m=3: (1 + 1 + 3/4) / 3 = 11/12;     m=4: 1.
  np.testing.assert_allclose(sch_curve(FOUR, 0, 2, [1, 2, 3, 4]), [5 / 12, 2 / 3, 11 / 12, 1])
  np.testing.assert_allclose(segment_cache_hit_rate(FOUR, 0, 2, 2), 2 / 3)
  # s = 4: one window n = [3,2,2,1], sum 8: m=1 -> 3/8.
  np.testing.assert_allclose(segment_cache_hit_rate(FOUR, 0, 4, 1), 3 / 8)


def test_sch_variable_k_and_sequences_in_any_storage_order():
  # Sequence A: {0,1} {0} {1,2}; sequence B: {3} {3}; stored B0 A0 A1 B1 A2.
  trace = make_trace([[3, -1], [0, 1], [0, -1], [3, -1], [1, 2]], 4,
                     sequence_ids=[1, 0, 0, 1, 0], positions=[0, 0, 1, 1, 2])
  # s = 2: A (A0,A1) n = [2,1,0,0] sum 3, (A1,A2) n = [1,1,1,0] sum 3; B n = [0,0,0,2] sum 2.
  # m=1: (2/3 + 1/3 + 2/2) / 3 = 2/3;  m=2: (3/3 + 2/3 + 2/2) / 3 = 8/9.
  np.testing.assert_allclose(sch_curve(trace, 0, 2, [1, 2]), [2 / 3, 8 / 9])
  # s = 3: only A, n = [2,2,1,0] sum 5: m=1 -> 2/5, m=2 -> 4/5.
  np.testing.assert_allclose(sch_curve(trace, 0, 3, [1, 2]), [2 / 5, 4 / 5])
  with pytest.raises(ValueError, match="s=4 is longer than every sequence"):
    segment_cache_hit_rate(trace, 0, 4, 1)


def test_sch_knee_hand_computed():
  ms, values = [1, 2, 3, 4], [5 / 12, 2 / 3, 11 / 12, 1.0]
  # fraction 0.9: target 5/12 + 0.9 * 7/12 = 11.3/12; 11/12 is short -> m = 4.
  assert sch_knee(ms, values) == 4
  # fraction 0.5: target 8.5/12 -> 11/12 at m = 3;  fraction 0.4: 7.8/12 -> 8/12 at m = 2.
  assert sch_knee(ms, values, fraction=0.5) == 3
  assert sch_knee(ms, values, fraction=0.4) == 2
  assert sch_knee([1, 2], [0.5, 0.6]) is None          # target 0.95 never reached
  assert sch_knee([2, 4], [1.0, 1.0]) == 2             # already perfect
  with pytest.raises(ValueError, match="ms must be"):
    sch_knee([2, 1], [0.5, 0.6])
  with pytest.raises(ValueError, match="fraction"):
    sch_knee([1, 2], [0.5, 0.6], fraction=0.0)


def test_srp_hand_computed():
  # FOUR, s = 2: the 12 n_we are 2,1,1,0 | 2,1,1,0 | 1,1,1,1; N = 12.
  # theta=1: P = 10, M = 12 -> 2*12 / (2*10 + 12) = 0.75;
  # theta=2: P = 2,  M = 4  -> 2*4 / (2*2 + 12) = 0.5.  SRP = 0.75 at theta 1.
  value, theta = segment_routing_best_performance(FOUR, 0, 2)
  np.testing.assert_allclose(value, 0.75)
  assert theta == 1
  # K = 1, E = 2, tokens 0 0 0 1, s = 4: n = [3, 1], N = 4.
  # theta=1: P = 2, M = 4 -> 8/(8+4) = 2/3;  theta=2,3: P = 1, M = 3 -> 6/(4+4) = 3/4;
  # theta=4: 0. SRP = 3/4 at the smallest best theta, 2.
  value, theta = segment_routing_best_performance(make_trace([[0], [0], [0], [1]], 2), 0, 4)
  np.testing.assert_allclose(value, 0.75)
  assert theta == 2


def test_srp_per_expert_hand_computed():
  trace = make_trace(FOUR.experts[0], 5)   # expert 4 never selected
  # s = 2. e0: n = 2,2,1, N = 5: theta1 10/(6+5) = 10/11, theta2 8/(4+5) = 8/9 -> 10/11.
  # e1, e2: n = 1,1,1, N = 3: theta1 6/(6+3) = 2/3, theta2 0.  e3: n = 0,0,1: 2/(2+1) = 2/3.
  value, theta = segment_routing_best_performance_per_expert(trace, 0, 2)
  np.testing.assert_allclose(value, [10 / 11, 2 / 3, 2 / 3, 2 / 3, np.nan])
  np.testing.assert_array_equal(theta, [1, 1, 1, 1, -1])


def test_bootstrap_interval_hand_computed():
  # Two sequences: (hits 1, windows 2) and (3, 2): alone 0.5 and 1.5, pooled 1.0. Each
  # resample of two is AA (1/4), AB or BA (1/2) or BB (1/4), so the 2.5% and 97.5%
  # percentiles of 1000 resamples are 0.5 and 1.5.
  parts = np.array([[1.0, 2.0], [3.0, 2.0]])
  got = bootstrap_interval(parts, lambda x: x[:, 0] / x[:, 1], seed=1)
  np.testing.assert_allclose(got, (1.0, 0.5, 1.5))
  again = bootstrap_interval(parts, lambda x: x[:, 0] / x[:, 1], num_resamples=50,
                             seed=np.random.default_rng(7))
  assert again == bootstrap_interval(parts, lambda x: x[:, 0] / x[:, 1], num_resamples=50,
                                     seed=7)
  with pytest.raises(ValueError, match="level"):
    bootstrap_interval(parts, lambda x: x[:, 0], level=1.5)
  with pytest.raises(ValueError, match="num_resamples"):
    bootstrap_interval(parts, lambda x: x[:, 0], num_resamples=0)


def test_sch_and_srp_intervals():
  # One sequence: every resample is the trace itself.
  np.testing.assert_allclose(sch_interval(FOUR, 0, 2, 2), (2 / 3, 2 / 3, 2 / 3))
  np.testing.assert_allclose(srp_interval(FOUR, 0, 2), (0.75, 0.75, 0.75))
  # Two sequences of 2 tokens, s = 2: A {0,1}{0,1} hit(m=1) = 2/4, B {0,1}{2,3} = 1/4;
  # pooled 3/8, resamples 1/2, 3/8 or 1/4.
  trace = make_trace([[0, 1], [0, 1], [0, 1], [2, 3]], 4, sequence_ids=[0, 0, 1, 1])
  np.testing.assert_allclose(sch_interval(trace, 0, 2, 1), (3 / 8, 1 / 4, 1 / 2))
  # SRP: A n = [2,2,0,0] -> 1 at theta 1 or 2; B n = [1,1,1,1] -> theta 1: 8/(8+4) = 2/3.
  # Pooled: hist n0:2 n1:4 n2:2, N = 8: theta1 16/(12+8) = 0.8, theta2 8/(4+8) = 2/3.
  np.testing.assert_allclose(srp_interval(trace, 0, 2), (0.8, 2 / 3, 1.0))


# --- fluctuation -----------------------------------------------------------------------

def test_fluctuation_hand_computed():
  a = make_trace([[[0, 1], [2, 3], [0, -1]], [[1, -1], [-1, -1], [2, 3]]], 4)
  b = make_trace([[[0, 2], [3, 2], [1, -1]], [[1, -1], [-1, -1], [3, 1]]], 4)
  # Layer 0: top-1 0/0 same, 2/3 changed, 0/1 changed -> 2/3.
  #   Jaccard: {0,1} vs {0,2}: 1 - 1/3;  {2,3} vs {2,3}: 0;  {0} vs {1}: 1 -> (2/3 + 0 + 1)/3 = 5/9.
  # Layer 1: top-1 1/1, -1/-1, 2/3 -> 1/3.  Jaccard: 0, 0 (both empty), {2,3} vs {1,3}: 2/3 -> 2/9.
  got = routing_fluctuation(a, b)
  np.testing.assert_allclose(got.top1_changed, [2 / 3, 1 / 3])
  np.testing.assert_allclose(got.jaccard, [5 / 9, 2 / 9])
  np.testing.assert_allclose([got.mean_top1_changed, got.mean_jaccard], [1 / 2, 7 / 18])
  other = make_trace(b.experts, 4, token_ids=[5, 1, 2])
  with pytest.raises(ValueError, match="traced different tokens"):
    routing_fluctuation(a, other)


# --- specialisation --------------------------------------------------------------------

def test_token_mutual_information_hand_computed():
  # ids 7 7 9 9 to experts 0 0 1 1: I = H(expert) = ln 2;  to 0 1 0 1: I = 0.
  np.testing.assert_allclose(
      token_expert_mutual_information(make_trace([[0], [0], [1], [1]], 2, token_ids=[7, 7, 9, 9]),
                                      0), LN2)
  np.testing.assert_allclose(
      token_expert_mutual_information(make_trace([[0], [1], [0], [1]], 2, token_ids=[7, 7, 9, 9]),
                                      0), 0.0, atol=1e-12)
  # ids 5 6 with {0,1} and {1}: assignments (5,0) (5,1) (6,1), each p = 1/3;
  # p(id) = 2/3, 1/3; p(e) = 1/3, 2/3.
  # I = 1/3 [ln(1/3 / (2/9)) + ln(1/3 / (4/9)) + ln(1/3 / (2/9))] = 1/3 ln(27/16).
  trace = make_trace([[0, 1], [1, -1]], 2, token_ids=[5, 6])
  np.testing.assert_allclose(token_expert_mutual_information(trace, 0), math.log(27 / 16) / 3)
  # The trainer's jax estimate agrees on the same table.
  joint = np.array([[1.0, 1.0], [0.0, 1.0]])
  np.testing.assert_allclose(float(mutual_information(joint)), _plug_in_mi(joint), rtol=1e-5)


def test_domain_mutual_information_hand_computed():
  # Domains 0 0 1 -1, experts 0 0 1 0: the unlabelled token is left out; (0,0) x2, (1,1) x1
  # -> I = H(2/3, 1/3) = ln 3 - (2/3) ln 2.
  trace = make_trace([[0], [0], [1], [0]], 2, domains=[0, 0, 1, -1])
  np.testing.assert_allclose(domain_expert_mutual_information(trace, 0), LN3 - 2 / 3 * LN2)
  with pytest.raises(ValueError, match="no domain labels"):
    domain_expert_mutual_information(FOUR, 0)


def test_majority_expert_share_hand_computed():
  # K = 1, ids 1 1 1 2 2 to experts 0 0 1 1 1: id 1 majority 0 (2 of 3), id 2 majority 1 (2 of 2)
  # -> share 4/5; overall e0 2, e1 3 -> baseline 3/5.
  trace = make_trace([[0], [0], [1], [1], [1]], 2, token_ids=[1, 1, 1, 2, 2])
  np.testing.assert_allclose(majority_expert_share(trace, 0)[:2], (4 / 5, 3 / 5))
  # Only ids with >= 3 tokens: id 1, counts [2, 1] -> 2/3 and 2/3.
  np.testing.assert_allclose(majority_expert_share(trace, 0, min_occurrences=3)[:2],
                             (2 / 3, 2 / 3))
  # K = 2, ids 1 1 2: {0,1} {0,2} {3,2}. id 1 counts e0 2, e1 1, e2 1 -> top 2 = 3 of 4;
  # id 2 -> 2 of 2; share 5/6. Overall 2,1,2,1 -> top 2 = 4 of 6.
  trace = make_trace([[0, 1], [0, 2], [3, 2]], 4, token_ids=[1, 1, 2])
  assert majority_expert_share(trace, 0) == pytest.approx((5 / 6, 2 / 3, 2))


# --- drops -----------------------------------------------------------------------------

def test_drop_rate_position_and_score_hand_computed():
  # K = 1, E = 2, four tokens all to expert 0; cf 1: C = ceil(1 * 4 * 1 / 2) = 2.
  trace = make_trace([[0], [0], [0], [0]], 2, weights=[[0.1], [0.9], [0.5], [0.7]])
  # position: t0, t1 kept.
  got = drop_rate_by_position(trace, 0, 1.0)
  np.testing.assert_allclose(got.by_position, [0, 0, 1, 1])
  np.testing.assert_allclose(got.overall, 0.5)
  # score: by weight 0.9 (t1), 0.7 (t3) kept; t0, t2 dropped.
  np.testing.assert_allclose(drop_rate_by_position(trace, 0, 1.0, "score").by_position,
                             [1, 0, 1, 0])
  # cf 0.25: C = ceil(0.5) = 1.
  np.testing.assert_allclose(drop_rate_by_position(trace, 0, 0.25).by_position, [0, 1, 1, 1])


def test_drop_rate_first_choices_before_second_choices():
  # E = 2, t0 {0,1}, t1 {1,0}; cf 0.5: C = ceil(0.5 * 2 * 2 / 2) = 1. Expert 0 keeps t0's
  # first choice; expert 1 keeps t1's first choice (rank 0 beats t0's rank 1, though t0 is
  # earlier). Dropped: both second choices -> 1/2 at each position.
  trace = make_trace([[0, 1], [1, 0]], 2)
  np.testing.assert_allclose(drop_rate_by_position(trace, 0, 0.5).by_position, [0.5, 0.5])


def test_drop_rate_groups():
  # Two sequences of 2 tokens, K = 1, all to expert 0, cf 1.
  trace = make_trace([[0], [0], [0], [0]], 2, sequence_ids=[0, 0, 1, 1])
  # One sequence per group: C = ceil(2/2) = 1: each sequence keeps position 0.
  np.testing.assert_allclose(drop_rate_by_position(trace, 0, 1.0).by_position, [0, 1])
  # Both in one group: C = ceil(4/2) = 2: sequence 0 kept, sequence 1 dropped.
  np.testing.assert_allclose(
      drop_rate_by_position(trace, 0, 1.0, sequences_per_group=2).by_position, [0.5, 0.5])


def test_observed_drop_rate_hand_computed():
  # Position 0 {0,1} kept T F; position 1 {0} kept T; position 2 {1,0} kept F F;
  # position 3 selects nothing -> [1/2, 0/1, 2/2, nan], overall 3/5.
  trace = make_trace([[0, 1], [0, -1], [1, 0], [-1, -1]], 2,
                     kept=[[True, False], [True, False], [False, False], [False, False]])
  got = observed_drop_rate_by_position(trace, 0)
  np.testing.assert_allclose(got.by_position, [0.5, 0.0, 1.0, np.nan])
  np.testing.assert_allclose(got.overall, 0.6)


# --- affinity, co-activation, diversity -----------------------------------------------

AFFINITY = make_trace([[[0, -1], [0, -1], [1, -1]], [[1, 2], [1, -1], [2, -1]]], 3)


def test_layer_affinity_hand_computed():
  # Pairs: t0 (0,1) (0,2); t1 (0,1); t2 (1,2). Row 0: [0, 2, 1] / 3; row 1: [0, 0, 1]; row 2: 0.
  np.testing.assert_allclose(layer_affinity(AFFINITY, 0),
                             [[0, 2 / 3, 1 / 3], [0, 0, 1], [0, 0, 0]])
  with pytest.raises(ValueError, match=r"layer must be an int in \[0, 1\)"):
    layer_affinity(AFFINITY, 1)


def test_conditional_entropy_hand_computed():
  # p over the 4 pairs: (0,1) 1/2, (0,2) 1/4, (1,2) 1/4. Given e=0 (prob 3/4): (2/3, 1/3),
  # H = ln 3 - (2/3) ln 2; given e=1: 0 -> H(E'|E) = (3/4) ln 3 - (1/2) ln 2.
  # Baseline: p(e') = (0, 1/2, 1/2) -> ln 2.
  cond = 0.75 * LN3 - 0.5 * LN2
  got = conditional_entropy(AFFINITY, 0)
  np.testing.assert_allclose(got, (cond, LN2, cond / LN2, LN2 - cond))


def test_coactivation_hand_computed():
  # Layer 1: {1,2} {1} {2}: i=1 in 2 of 3, i=2 in 2 of 3, both in 1 of 3.
  np.testing.assert_allclose(coactivation(AFFINITY, 1),
                             [[0, 0, 0], [0, 2 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])


def test_distinct_combinations_and_paths_hand_computed():
  trace = make_trace([[[0, 1], [1, 0], [2, -1], [-1, -1]],
                      [[3, -1], [3, -1], [0, 1], [0, 1]]], 4)
  # Layer 0: {0,1} twice (order ignored), {2}, {} -> 3 of 4 tokens; layer 1: {3}, {0,1} -> 2.
  assert distinct_combinations(trace, 0) == (3, 0.75)
  assert distinct_combinations(trace, 1) == (2, 0.5)
  # Paths: t0 = t1 = ({0,1},{3}); ({2},{0,1}); ({},{0,1}) -> 3.
  assert distinct_paths(trace) == (3, 0.75)


# --- load ------------------------------------------------------------------------------

LOADED = make_trace([[0, 1], [0, 2], [0, 1]], 4,
                    kept=[[True, True], [True, True], [True, False]])


def test_load_max_violation_cv_hand_computed():
  # Kept: e0 3, e1 1, e2 1, e3 0; mean 5/4. MaxVio = (3 - 1.25) / 1.25 = 1.4.
  # Deviations 1.75 -0.25 -0.25 -1.25, squares sum 4.75, / 4 -> std sqrt(19)/4; CV sqrt(19)/5.
  np.testing.assert_array_equal(expert_load(LOADED, 0), [3, 1, 1, 0])
  np.testing.assert_allclose(max_violation(LOADED, 0), 1.4)
  np.testing.assert_allclose(load_cv(LOADED, 0), math.sqrt(19) / 5)


def test_max_violation_interval_hand_computed():
  np.testing.assert_allclose(max_violation_interval(LOADED, 0), (1.4, 1.4, 1.4))
  # Sequence A loads [2, 0], B [0, 2]: pooled [2, 2] -> 0. Resamples AA, BB -> MaxVio 1
  # (prob 1/2), AB -> 0 (prob 1/2): interval [0, 1].
  trace = make_trace([[0], [0], [1], [1]], 2, sequence_ids=[0, 0, 1, 1])
  np.testing.assert_allclose(max_violation_interval(trace, 0, seed=3), (0.0, 0.0, 1.0))


def test_balance_over_checkpoints_hand_computed():
  late = make_trace(LOADED.experts, 4, kept=LOADED.kept, meta={"step": 20})
  early = make_trace([[0, 1], [2, 3], [0, 1]], 4, kept=[[1, 1], [1, 1], [0, 0]],
                     meta={"step": 10})   # kept 1 1 1 1: balanced
  got = balance_over_checkpoints([late, early])
  np.testing.assert_array_equal(got.steps, [10, 20])
  np.testing.assert_allclose(got.max_violation, [[0.0], [1.4]])
  np.testing.assert_allclose(got.load_cv, [[0.0], [math.sqrt(19) / 5]])
  with pytest.raises(ValueError, match="distinct steps"):
    balance_over_checkpoints([late, late])
  with pytest.raises(ValueError, match=r"traces\[0\] has no int meta\['step'\]"):
    balance_over_checkpoints([LOADED])
  with pytest.raises(ValueError, match="traced different tokens"):
    balance_over_checkpoints([late, make_trace(LOADED.experts, 4, token_ids=[3, 3, 3],
                                               meta={"step": 5})])


# --- errors and exports ----------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: segment_cache_hit_rate(FOUR, 0, 0, 1), "s must be an int >= 1"),
    (lambda: segment_cache_hit_rate(FOUR, 0, 2, 0), "m must be an int >= 1 and <= 4"),
    (lambda: segment_cache_hit_rate(FOUR, 0, 2, 5), "m must be an int >= 1 and <= 4"),
    (lambda: sch_curve(FOUR, 0, 2, [1, 5]), "m must be"),
    (lambda: segment_routing_best_performance(FOUR, 1, 2), r"layer must be an int in \[0, 1\)"),
    (lambda: segment_routing_best_performance(FOUR, -1, 2), "layer must be"),
    (lambda: token_expert_mutual_information(FOUR, True), "layer must be"),
    (lambda: drop_rate_by_position(FOUR, 0, 0.0), "capacity_factor must be"),
    (lambda: drop_rate_by_position(FOUR, 0, -1.0), "capacity_factor must be"),
    (lambda: drop_rate_by_position(FOUR, 0, 1.0, policy="random"), "policy must be"),
    (lambda: drop_rate_by_position(FOUR, 0, 1.0, sequences_per_group=0),
     "sequences_per_group must be"),
    (lambda: layer_affinity(FOUR, 0), "needs a trace of 2 or more layers"),
    (lambda: majority_expert_share(FOUR, 0, k=5), "k must be"),
])
def test_bad_arguments_raise_one_line(call, match):
  with pytest.raises(ValueError, match=match) as info:
    call()
  assert "\n" not in str(info.value)


def test_package_exports():
  assert analysis.load is traces.load and analysis.save is traces.save
  assert analysis.RoutingTrace is traces.RoutingTrace
  for name in analysis.__all__:
    assert callable(getattr(analysis, name)), name


# --- fuzzed invariants, against naive references ---------------------------------------

@st.composite
def random_traces(draw, min_layers=1):
  """Traces of 1-3 layers, 1-3 sequences of 1-7 tokens, E 2-6, K 1-3 with padding."""
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  num_layers = draw(st.integers(min_layers, 3))
  num_experts = draw(st.integers(2, 6))
  k = draw(st.integers(1, min(3, num_experts)))
  lengths = draw(st.lists(st.integers(1, 7), min_size=1, max_size=3))
  t = sum(lengths)
  experts = np.argsort(rng.random((num_layers, t, num_experts)), axis=2)[..., :k]
  count = rng.integers(0 if draw(st.booleans()) else k, k + 1, size=(num_layers, t, 1))
  experts = np.where(np.arange(k) < count, experts, -1)
  weights = np.sort(rng.random((num_layers, t, k)), axis=2)[..., ::-1]
  sequence_ids = np.repeat(rng.permutation(len(lengths)), lengths)
  perm = rng.permutation(t)                          # stored in any order
  return make_trace(experts[:, perm], num_experts, weights=weights[:, perm],
                    kept=rng.random((num_layers, t, k))[:, perm] < 0.8,
                    token_ids=rng.integers(0, 4, t), sequence_ids=sequence_ids[perm],
                    domains=rng.integers(-1, 3, t), meta={"step": 1})


def naive_window_counts(trace, layer, s):
  rows = []
  for seq in trace.sequences():
    for start in range(len(seq) - s + 1):
      n = np.zeros(trace.num_experts)
      for t in seq[start:start + s]:
        for e in set(int(e) for e in trace.experts[layer, t] if e >= 0):
          n[e] += 1
      rows.append(n)
  return rows


@hypothesis.given(random_traces(), st.integers(1, 4))
def test_sch_and_srp_match_naive_windows(trace, s):
  rows = naive_window_counts(trace, 0, s)
  hypothesis.assume(rows and any(n.sum() > 0 for n in rows))
  e = trace.num_experts
  curve = sch_curve(trace, 0, s, list(range(1, e + 1)))
  want = [np.mean([np.sort(n)[::-1][:m].sum() / n.sum() for n in rows if n.sum() > 0])
          for m in range(1, e + 1)]
  np.testing.assert_allclose(curve, want)
  assert np.all(np.diff(curve) >= -1e-12) and curve[-1] == pytest.approx(1.0)
  assert np.all(curve >= np.arange(1, e + 1) / e - 1e-12)   # top m of E >= m/E of the total
  if s == 1:
    assert np.all(curve[trace.experts.shape[2] - 1:] == pytest.approx(1.0))
  n = np.array(rows)
  f1 = [2 * n[n >= th].sum() / (s * np.sum(n >= th) + n.sum()) for th in range(1, s + 1)]
  value, theta = segment_routing_best_performance(trace, 0, s)
  np.testing.assert_allclose(value, max(f1))
  assert theta == int(np.argmax(f1)) + 1 and 0 <= value <= 1
  if s == 1:
    np.testing.assert_allclose(value, 1.0)
  per_expert, _ = segment_routing_best_performance_per_expert(trace, 0, s)
  used = n.sum(axis=0) > 0
  assert np.all((per_expert[used] >= 0) & (per_expert[used] <= 1 + 1e-12))
  assert np.all(np.isnan(per_expert[~used]))


@hypothesis.given(random_traces(), st.integers(0, 2**31 - 1))
def test_fluctuation_invariants(a, seed):
  zero = routing_fluctuation(a, a)
  assert zero.mean_top1_changed == 0 and zero.mean_jaccard == 0
  # b: a with the experts of about half the tokens relabelled by a permutation.
  rng = np.random.default_rng(seed)
  perm = rng.permutation(a.num_experts)
  moved = rng.random(a.num_tokens) < 0.5
  experts = np.where(moved[None, :, None] & (a.experts >= 0), perm[a.experts], a.experts)
  b = make_trace(experts, a.num_experts, token_ids=a.token_ids, positions=a.positions,
                 sequence_ids=a.sequence_ids)
  ab, ba = routing_fluctuation(a, b), routing_fluctuation(b, a)
  np.testing.assert_allclose(ab.jaccard, ba.jaccard)
  np.testing.assert_allclose(ab.top1_changed, ba.top1_changed)
  assert np.all(ab.top1_changed <= moved.mean() + 1e-12)
  naive = [np.mean([1 - len(x & y) / len(x | y) if x | y else 0.0 for x, y in
                    ((set(a.experts[l, t][a.experts[l, t] >= 0]),
                      set(b.experts[l, t][b.experts[l, t] >= 0])) for t in range(a.num_tokens))])
           for l in range(a.num_layers)]
  np.testing.assert_allclose(ab.jaccard, naive)
  np.testing.assert_allclose(ab.mean_jaccard, np.mean(naive))


def entropy(counts):
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


@hypothesis.given(random_traces())
def test_mutual_information_bounds(trace):
  experts = trace.experts[0]
  t, k = np.nonzero(experts >= 0)
  hypothesis.assume(t.size > 0)
  ids, e = trace.token_ids[t], experts[t, k]
  mi = token_expert_mutual_information(trace, 0)
  bound = min(entropy(np.unique(ids, return_counts=True)[1]),
              entropy(np.unique(e, return_counts=True)[1]))
  assert -1e-12 <= mi <= bound + 1e-9
  # Reordering the token ids (a relabelling) leaves I unchanged.
  relabelled = make_trace(trace.experts, trace.num_experts, token_ids=100 - trace.token_ids,
                          sequence_ids=trace.sequence_ids, positions=trace.positions)
  np.testing.assert_allclose(token_expert_mutual_information(relabelled, 0), mi, atol=1e-12)
  if np.any(trace.domains[t] >= 0):
    assert domain_expert_mutual_information(trace, 0) >= 0
  share, baseline, _ = majority_expert_share(trace, 0)
  assert 0 < baseline <= share + 1e-12 and share <= 1 + 1e-12


def naive_drops(trace, layer, cf, spg, k):
  """Dropped share per position by simulation: each group, rank by rank, token by token."""
  seqs = trace.sequences()
  dropped = np.zeros(trace.experts.shape[1:], bool)
  for g in range(0, len(seqs), spg):
    tokens = [int(t) for seq in seqs[g:g + spg] for t in seq]
    cap = max(1, math.ceil(cf * len(tokens) * k / trace.num_experts - 1e-9))
    used = np.zeros(trace.num_experts, int)
    for rank in range(trace.experts.shape[2]):
      for t in tokens:
        chosen = [j for j in range(trace.experts.shape[2]) if trace.experts[layer, t, j] >= 0]
        if rank < len(chosen):
          j = chosen[rank]
          e = trace.experts[layer, t, j]
          dropped[t, j] = used[e] >= cap
          used[e] += 1
  return dropped


@hypothesis.given(random_traces(), st.sampled_from([0.25, 0.5, 1.0, 2.0]), st.integers(1, 3))
def test_drops_match_naive_simulation(trace, cf, spg):
  k = trace.experts.shape[2]
  dropped = naive_drops(trace, 0, cf, spg, k)
  sel = trace.experts[0] >= 0
  hypothesis.assume(sel.any())
  got = drop_rate_by_position(trace, 0, cf, sequences_per_group=spg)
  np.testing.assert_allclose(got.overall, dropped[sel].sum() / sel.sum())
  for p, rate in enumerate(got.by_position):
    at = sel & (trace.positions == p)[:, None]
    np.testing.assert_allclose(rate, dropped[at].sum() / at.sum() if at.any() else np.nan)
  assert drop_rate_by_position(trace, 0, 1e6, "score").overall == 0
  assert drop_rate_by_position(trace, 0, cf, "score", spg).overall == pytest.approx(got.overall)
  assert drop_rate_by_position(trace, 0, 2 * cf, sequences_per_group=spg).overall <= got.overall
  observed = observed_drop_rate_by_position(trace, 0)
  assert 0 <= observed.overall <= 1


@hypothesis.given(random_traces(min_layers=2))
def test_affinity_and_coactivation_invariants(trace):
  rows = layer_affinity(trace, 0).sum(axis=1)
  # An expert's row sums to 1 iff some token selected it at layer 0 and anything at layer 1.
  onward = np.any(trace.experts[1] >= 0, axis=1)
  followed = [np.any(np.any(trace.experts[0] == e, axis=1) & onward)
              for e in range(trace.num_experts)]
  np.testing.assert_allclose(rows, np.where(followed, 1.0, 0.0), atol=1e-12)
  co = coactivation(trace, 1)
  np.testing.assert_allclose(co, co.T)
  assert np.all(co <= np.diag(co)[:, None] + 1e-12)
  np.testing.assert_allclose(np.trace(co), np.mean(np.sum(trace.experts[1] >= 0, axis=1)))
  ent = conditional_entropy(trace, 0)
  if not math.isnan(ent.conditional):
    assert -1e-12 <= ent.conditional <= ent.baseline + 1e-9 and ent.information >= 0


@hypothesis.given(random_traces())
def test_diversity_and_load_invariants(trace):
  sets = [[frozenset(int(e) for e in trace.experts[y, t] if e >= 0)
           for t in range(trace.num_tokens)] for y in range(trace.num_layers)]
  for y in range(trace.num_layers):
    got = distinct_combinations(trace, y)
    assert got.count == len(set(sets[y]))
    np.testing.assert_allclose(got.share, len(set(sets[y])) / trace.num_tokens)
  assert distinct_paths(trace).count == len(set(zip(*sets)))
  counts = expert_load(trace, 0)
  assert counts.sum() == np.sum(trace.kept[0] & (trace.experts[0] >= 0))
  if counts.sum() > 0:
    e = trace.num_experts
    assert 0 <= max_violation(trace, 0) <= e - 1 + 1e-9
    assert 0 <= load_cv(trace, 0) <= math.sqrt(e - 1) + 1e-9


def test_expert_specialisation_hand_computed():
  # K = 1, E = 3. Domains 0 0 1 1 to experts 0 0 1 0: P(domain) = (1/2, 1/2).
  # Expert 0 serves domains (0, 0, 1): P = (2/3, 1/3), KL = 2/3 ln(4/3) + 1/3 ln(2/3).
  # Expert 1 serves domain 1 only: KL = ln 2. Expert 2 is never selected: NaN.
  trace = make_trace([[0], [0], [1], [0]], 3, token_ids=[5, 6, 5, 6], domains=[0, 0, 1, 1])
  got = expert_specialisation(trace, 0, by="domain")
  want0 = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
  np.testing.assert_allclose(got[:2], [want0, LN2], rtol=1e-12)
  assert np.isnan(got[2])
  # By token id: ids (5, 6, 5, 6) are also half and half; expert 0 serves 5, 6, 6.
  want0 = 1 / 3 * math.log(2 / 3) + 2 / 3 * math.log(4 / 3)
  np.testing.assert_allclose(expert_specialisation(trace, 0)[:2], [want0, LN2], rtol=1e-12)
  # P(e)-weighted mean = I(domain; expert).
  p_e = np.array([3, 1]) / 4
  np.testing.assert_allclose(np.dot(p_e, got[:2]), domain_expert_mutual_information(trace, 0),
                             rtol=1e-12)
  with pytest.raises(ValueError, match="by must be"):
    expert_specialisation(trace, 0, by="vocabulary")


def test_shuffled_information_is_zero_when_the_next_layer_is_constant():
  # Layer 1 always picks expert 3: H(E_1) = 0, so I = 0 whatever the permutation,
  # while layer 1 copying layer 0 gives I = H(E_0) = ln 2 unshuffled.
  layer0 = [[0], [1], [0], [1]]
  trace = make_trace([layer0, [[3], [3], [3], [3]]], 4)
  assert shuffled_information(trace, 0) == 0.0
  copied = make_trace([layer0, layer0], 4)
  np.testing.assert_allclose(conditional_entropy(copied, 0).information, LN2, rtol=1e-12)
  # Shuffled over tokens, the copy keeps its marginal: I drops below ln 2 on average.
  assert shuffled_information(copied, 0, repeats=20) < LN2 - 0.1


def test_balance_over_checkpoints_reports_the_mean_router_entropy():
  # Two checkpoints of one layer; entropies (ln 2, 0, NaN) -> mean ln 2 / 2 over the
  # finite ones; a trace without recorded entropies gives NaN.
  base = make_trace([[0], [1], [0]], 2, meta={"step": 10})
  a = traces.RoutingTrace(**{**base.__dict__,
                             "router_entropy": np.array([[LN2, 0.0, np.nan]], np.float32)})
  b = traces.RoutingTrace(**{**base.__dict__, "meta": {**base.meta, "step": 20},
                             "router_entropy": None})
  got = balance_over_checkpoints([b, a])
  np.testing.assert_array_equal(got.steps, [10, 20])
  np.testing.assert_allclose(got.router_entropy[0], [LN2 / 2], rtol=1e-6)
  assert np.isnan(got.router_entropy[1, 0])
