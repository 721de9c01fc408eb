"""Router zoo I, router by router: hand-computed small cases and invariants.

Most cases fix the gate kernel to the identity, so that the logits are the input
rows and the arithmetic can be done by hand.
"""
from __future__ import annotations

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import MoE, routers
from moejax.core import RoutingContext
from moejax.routers import expert_choice, hash_random, relu, sinkhorn, top_p
from moejax.routers.soft import slot_plan
from tests.helpers import jit_init


def _identity_gate(name, logits, **kwargs):
  """Apply router `name` with W_g = I, so z = x = logits [T, E]."""
  logits = jnp.asarray(logits, jnp.float32)
  num_experts = kwargs.pop("num_experts", logits.shape[-1])
  router = routers.create(name, num_experts=num_experts, **kwargs)
  return router, logits


def _apply(router, x, params, ctx=None, deterministic=True, rngs=None, routing=None):
  variables = {"params": params, **({"routing": routing} if routing else {})}
  out = router.apply(variables, x, ctx, deterministic=deterministic, rngs=rngs or {},
                     mutable=["routing"])
  return out


def _eye_params(n):
  return {"gate": {"kernel": jnp.eye(n, dtype=jnp.float32)}}


# ---------------------------------------------------------------------------
# expert_choice

def test_expert_choice_by_hand():
  # S = softmax rows: t0 [.881 .119], t1 [.119 .881], t2 [.731 .269], t3 [.269 .731].
  # C = ceil(1.0 * 4 tokens * K=1 / 2 experts) = 2: expert 0 takes t0, t2; expert 1 t1, t3.
  router, x = _identity_gate("expert_choice", [[2., 0.], [0., 2.], [1., 0.], [0., 1.]], top_k=1)
  out, _ = _apply(router, x, _eye_params(2))
  plan = out.plan
  np.testing.assert_array_equal(plan.expert, [0, 0, 1, 1])
  np.testing.assert_array_equal(plan.token, [0, 2, 1, 3])
  s = lambda a: 1 / (1 + math.exp(-a))
  np.testing.assert_allclose(plan.weight, [s(2), s(1), s(2), s(1)], rtol=1e-6)
  assert float(out.metrics["unrouted_share"]) == 0.0


def test_expert_choice_leaves_tokens_unrouted_and_doubles_others():
  # S rows: t0 [.5 .5], t1 [.5 .5], t2 [.731 .269], t3 [.269 .731]. C = 2.
  # Expert 0 takes t2, then t0 (the tie with t1 goes to the earlier token);
  # expert 1 takes t3, then t0. t0 gets two experts, t1 none.
  router, x = _identity_gate("expert_choice", [[3., 3.], [2., 2.], [0., -1.], [-1., 0.]],
                             top_k=1)
  out, _ = _apply(router, x, _eye_params(2))
  np.testing.assert_array_equal(out.plan.token, [2, 0, 3, 0])
  np.testing.assert_allclose(out.plan.weight, [1 / (1 + math.exp(-1)), 0.5,
                                               1 / (1 + math.exp(-1)), 0.5], rtol=1e-6)
  assert float(out.metrics["unrouted_share"]) == 0.25


# Each example compiles its own shapes: two thirds of the profile's examples.
@hypothesis.settings(max_examples=max(4, hypothesis.settings.default.max_examples * 2 // 3))
@hypothesis.given(seed=st.integers(0, 2**16), tokens=st.sampled_from([1, 7, 24]),
                  experts=st.sampled_from([1, 3, 6]), k=st.integers(1, 3),
                  factor=st.sampled_from([0.5, 1.0, 1.25, 2.0]))
def test_expert_choice_gives_every_expert_exactly_c_distinct_tokens(seed, tokens, experts, k,
                                                                    factor):
  router = routers.create("expert_choice", num_experts=experts, top_k=k, capacity_factor=factor)
  x = jax.random.normal(jax.random.key(seed), (tokens, 5))
  variables = jit_init(router, jax.random.key(seed + 1), x)
  plan = router.apply(variables, x).plan
  cap = min(math.ceil(factor * tokens * k / experts), tokens)
  assert plan.num_slots == experts * cap and bool(jnp.all(plan.valid))
  counts = np.bincount(np.asarray(plan.expert), minlength=experts)
  np.testing.assert_array_equal(counts, cap)
  for e in range(experts):
    chosen = np.asarray(plan.token)[np.asarray(plan.expert) == e]
    assert len(set(chosen.tolist())) == cap


def test_expert_choice_capacity_from_context_static_and_traced():
  router = routers.create("expert_choice", num_experts=2, top_k=1, max_capacity=3)
  x = jax.random.normal(jax.random.key(0), (6, 4))
  variables = jit_init(router, jax.random.key(1), x)
  static = router.apply(variables, x, RoutingContext(capacity=1)).plan
  assert static.num_slots == 2 and bool(jnp.all(static.valid))

  @jax.jit
  def traced(capacity):
    return router.apply(variables, x, RoutingContext(capacity=capacity)).plan
  for cap in (1, 2, 3):
    plan = traced(jnp.int32(cap))
    assert plan.num_slots == 2 * 3                     # A = E * max_capacity
    np.testing.assert_array_equal(np.bincount(np.asarray(plan.expert)[np.asarray(plan.valid)],
                                              minlength=2), [cap, cap])
    assert float(jnp.sum(jnp.where(plan.valid, 0.0, plan.weight))) == 0.0


def test_expert_choice_never_chooses_padding():
  # t1 is padding: expert 0 (C = 2) would take t0 and t1; it takes t0 and t2 instead.
  # With only 2 real tokens of 3 and C = 3, each expert's third slot is invalid.
  router, x = _identity_gate("expert_choice", [[3., 0.], [2., 0.], [1., 0.]], top_k=1,
                             capacity_factor=4 / 3)
  ctx = RoutingContext(segment_ids=jnp.array([[1, 0, 1]]))
  plan = _apply(router, x, _eye_params(2), ctx)[0].plan
  assert plan.num_slots == 2 * 2
  np.testing.assert_array_equal(plan.token[:2], [0, 2])
  ctx = ctx.replace(capacity=3)
  plan = _apply(router, x, _eye_params(2), ctx)[0].plan
  np.testing.assert_array_equal(plan.valid, [True, True, False] * 2)
  assert float(jnp.sum(jnp.where(plan.valid, 0.0, plan.weight))) == 0.0


def test_soft_gives_padding_no_dispatch_weight():
  router = routers.create("soft", num_experts=2, top_k=1)
  x = jax.random.normal(jax.random.key(0), (1, 4, 3))
  variables = router.init(jax.random.key(1), x)
  ctx = RoutingContext(segment_ids=jnp.array([[1, 1, 0, 2]]))
  routing = router.apply(variables, x, ctx)
  np.testing.assert_allclose(routing.dispatch[0, 2], 0.0, atol=1e-30)
  np.testing.assert_allclose(jnp.sum(routing.dispatch, axis=1), 1.0, rtol=1e-6)


def test_expert_choice_capacity_formula():
  assert expert_choice.expert_capacity(16, 2, 8, 1.0) == 4
  assert expert_choice.expert_capacity(16, 2, 8, 1.1) == 5      # ceil(4.4)
  assert expert_choice.expert_capacity(4, 2, 1, 3.0) == 4       # at most T


# ---------------------------------------------------------------------------
# sinkhorn and selective_sinkhorn

@hypothesis.given(seed=st.integers(0, 2**16), tokens=st.sampled_from([2, 17, 64]),
                  experts=st.sampled_from([2, 5, 16]), scale=st.sampled_from([0.5, 1.0, 2.0]))
def test_sinkhorn_plan_marginals_are_uniform_after_its_iterations(seed, tokens, experts, scale):
  router = routers.create("sinkhorn", num_experts=experts)
  logits = scale * jax.random.normal(jax.random.key(seed), (tokens, experts))
  log_plan = sinkhorn.sinkhorn_log_plan(logits, router.iterations, router.epsilon)
  plan = np.exp(np.asarray(log_plan, np.float64))
  np.testing.assert_allclose(plan.sum(axis=1), 1 / tokens, rtol=1e-3)
  np.testing.assert_allclose(plan.sum(axis=0), 1 / experts, rtol=1e-3)
  assert float(sinkhorn.marginal_error(log_plan)) < 1e-3


def test_sinkhorn_plan_of_a_symmetric_two_by_two():
  # z = [[a, 0], [0, a]]: P = [[p, q], [q, p]] with p + q = 1/2, p / q = e^a.
  a = 1.5
  log_plan = sinkhorn.sinkhorn_log_plan(jnp.array([[a, 0.], [0., a]]), 3, 1.0)
  p = math.exp(a) / (math.exp(a) + 1) / 2
  np.testing.assert_allclose(np.exp(log_plan), [[p, 0.5 - p], [0.5 - p, p]], rtol=1e-6)


# Every token prefers expert 0, by s = 4, 3, 2, 1. Top-1 sends all four there;
# the balanced plan has column ratio v0/v1 = e^-2.5 (the s are symmetric about
# 2.5), so P[t, 0] > P[t, 1] iff s_t > 2.5: t0, t1 to expert 0, t2, t3 to expert 1.
SKEWED = [[4., 0.], [3., 0.], [2., 0.], [1., 0.]]


@pytest.mark.parametrize("name", ["sinkhorn", "selective_sinkhorn"])
def test_sinkhorn_balances_what_top1_does_not(name):
  router, x = _identity_gate(name, SKEWED, top_k=1, iterations=50, fraction=1.0)
  (out, _) = _apply(router, x, _eye_params(2), deterministic=False,
                    rngs={"router": jax.random.key(0)})
  np.testing.assert_array_equal(out.plan.expert, [0, 0, 1, 1])
  probs = jax.nn.softmax(x, axis=-1)
  if name == "sinkhorn":     # S-BASE: softmax gates of the chosen experts
    np.testing.assert_allclose(out.plan.weight, probs[jnp.arange(4), out.plan.expert], rtol=1e-6)
  else:                      # SSR: gates T * P[t, e] from the plan
    log_plan = sinkhorn.sinkhorn_log_plan(x, 50, 1.0)
    want = 4 * jnp.exp(log_plan)[jnp.arange(4), out.plan.expert]
    np.testing.assert_allclose(out.plan.weight, want, rtol=1e-5)
  assert float(out.metrics["transport_share"]) == 1.0
  # Inference is plain top-1: all four to expert 0, softmax gates.
  (out, _) = _apply(router, x, _eye_params(2), deterministic=True)
  np.testing.assert_array_equal(out.plan.expert, [0, 0, 0, 0])
  np.testing.assert_allclose(out.plan.weight, probs[:, 0], rtol=1e-6)


def test_selective_sinkhorn_gates_carry_gradient_through_the_plan():
  router, x = _identity_gate("selective_sinkhorn", SKEWED, top_k=1, fraction=1.0)
  def gate_sum(kernel):
    out, _ = _apply(router, x, {"gate": {"kernel": kernel}}, deterministic=False,
                    rngs={"router": jax.random.key(0)})
    return jnp.sum(out.plan.weight * jnp.arange(1., 5.))
  assert float(jnp.max(jnp.abs(jax.grad(gate_sum)(jnp.eye(2))))) > 1e-4


@pytest.mark.parametrize("fraction_of", ["steps", "tokens"])
def test_selective_fraction_is_the_share_of_routing_on_the_plan(fraction_of):
  router, x = _identity_gate("selective_sinkhorn", SKEWED, top_k=1, fraction=0.3,
                             fraction_of=fraction_of)
  share = jax.jit(jax.vmap(lambda key: _apply(
      router, x, _eye_params(2), deterministic=False,
      rngs={"router": key})[0].metrics["transport_share"]))
  shares = np.asarray(share(jax.random.split(jax.random.key(0), 200)))
  if fraction_of == "steps":
    assert set(shares.tolist()) == {0.0, 1.0}
  # 200 draws (800 for tokens) of Bernoulli(0.3): the mean is within 4.5 sigma.
  draws = 200 if fraction_of == "steps" else 800
  assert abs(np.mean(shares) - 0.3) < 4.5 * math.sqrt(0.3 * 0.7 / draws)


# ---------------------------------------------------------------------------
# top_p

@pytest.mark.parametrize("threshold,k_max,want_k,capped", [
    (0.5, 4, 1, 0.0),    # 0.5 >= 0.5 after one expert
    (0.6, 4, 2, 0.0),    # 0.5 < 0.6 <= 0.8
    (0.9, 4, 3, 0.0),    # 0.8 < 0.9 <= 0.95
    (0.97, 3, 3, 1.0),   # 0.95 < 0.97 and K_max = 3: cut short, counted
])
def test_top_p_by_hand(threshold, k_max, want_k, capped):
  probs = jnp.array([[0.3, 0.5, 0.05, 0.15]])
  router, x = _identity_gate("top_p", jnp.log(probs), top_k=k_max, threshold=threshold)
  out, _ = _apply(router, x, _eye_params(4))
  plan = out.plan
  assert int(jnp.sum(plan.valid)) == want_k
  np.testing.assert_array_equal(plan.expert[:want_k], [1, 0, 3][:want_k])
  np.testing.assert_allclose(plan.weight[:want_k], [0.5, 0.3, 0.15][:want_k], rtol=1e-5)
  assert float(out.metrics["capped_share"]) == capped
  # Entropy penalty: H(p) in nats.
  h = -sum(p * math.log(p) for p in [0.3, 0.5, 0.05, 0.15])
  np.testing.assert_allclose(out.losses["entropy"], h, rtol=1e-5)


@hypothesis.given(seed=st.integers(0, 2**16), threshold=st.floats(0.05, 0.95),
                  temperature=st.sampled_from([0.3, 1.0, 3.0]))
def test_top_p_selects_the_smallest_prefix_reaching_p(seed, threshold, temperature):
  experts = 8
  logits = jax.random.normal(jax.random.key(seed), (32, experts)) * temperature
  router, x = _identity_gate("top_p", logits, top_k=experts, threshold=threshold)
  plan = _apply(router, x, _eye_params(experts))[0].plan
  probs = np.asarray(jax.nn.softmax(x, axis=-1), np.float64)
  valid = np.asarray(plan.valid).reshape(32, experts)
  chosen = np.asarray(plan.expert).reshape(32, experts)
  for t in range(32):
    picked = chosen[t][valid[t]]
    mass = probs[t, picked].sum()
    assert mass >= threshold - 1e-6                                  # reaches p
    assert mass - probs[t, picked[-1]] < threshold + 1e-6            # minimal
    rest = np.setdiff1d(np.arange(experts), picked)                  # the largest ones
    assert len(rest) == 0 or probs[t, picked].min() >= probs[t, rest].max() - 1e-7


def test_top_p_mask_keeps_at_least_one():
  keep, short = top_p.top_p_mask(jnp.array([[0.9, 0.1]]), 0.05)
  np.testing.assert_array_equal(keep, [[True, False]])
  assert not bool(short[0])


# ---------------------------------------------------------------------------
# null_experts

def test_null_experts_by_hand():
  # E = 2 true experts (0, 1) and N = 2 nulls (2, 3), K = 2, logits = x.
  # t0 prefers experts 0 and 1; t1 prefers null 2, then expert 1.
  x = jnp.array([[2., 1., 0., 0.], [0., 1., 3., 0.]])
  # normalize_over='all' (the default, AdaMoE's 'true_experts', is in
  # test_router_fidelity.py).
  router = routers.create("null_experts", num_experts=2, num_null=2, top_k=2, reference_k=2,
                          normalize_over="all")
  params = {"scores": {"gate": {"kernel": jnp.eye(4)}}}
  out = router.apply({"params": params}, x)
  plan = out.plan
  np.testing.assert_array_equal(plan.valid, [True, True, False, True])
  np.testing.assert_array_equal(plan.expert, [0, 1, 0, 1])     # the null slot points at 0
  p1 = jax.nn.softmax(x[1])
  # Weights renormalised over all K choices, nulls included: t1's expert 1 keeps
  # p1[1] / (p1[2] + p1[1]) and the null's mass is not redistributed.
  np.testing.assert_allclose(plan.weight[3], p1[1] / (p1[1] + p1[2]), rtol=1e-6)
  assert float(plan.weight[2]) == 0.0
  assert out.logits.shape == (2, 4) and out.probs.shape == (2, 4)
  np.testing.assert_allclose(out.metrics["null_share"], 0.25)
  np.testing.assert_allclose(out.metrics["flops_ratio"], 1.5 / 2)  # 3 true slots / 2 tokens / K


def test_null_assignments_never_reach_an_expert():
  # A token whose K choices are all null gets exactly zero output.
  layer = MoE(num_experts=2, top_k=2, hidden_dim=4, router="null_experts",
              router_kwargs={"num_null": 2})
  x = jnp.array([[[1., 0., 0., 0.], [0., 0., 1., 1.]]])
  variables = jit_init(layer, jax.random.key(0), x)
  params = jax.tree_util.tree_map(lambda v: v, variables["params"])
  params["router"]["scores"]["gate"]["kernel"] = jnp.array(
      [[5., 4., 0., 0.], [0., 0., 0., 0.], [0., 0., 5., 0.], [0., 0., 0., 5.]])
  y, aux = layer.apply({"params": params}, x)
  assert float(jnp.max(jnp.abs(y[0, 1]))) == 0.0 and float(jnp.max(jnp.abs(y[0, 0]))) > 0
  np.testing.assert_allclose(aux.metrics["experts_per_token"], 1.0)
  np.testing.assert_array_equal(aux.metrics["load"], [1, 1])


def test_null_experts_balance_loss_counts_all_e_plus_n():
  # Balanced over E + N = 4 (each of the 4 chosen once by 4 tokens with K = 1) gives 1.
  x = jnp.eye(4) * 3
  router = routers.create("null_experts", num_experts=2, num_null=2, top_k=1)
  out = router.apply({"params": {"scores": {"gate": {"kernel": jnp.eye(4)}}}}, x)
  p = jax.nn.softmax(x, axis=-1)
  want = 4 * float(jnp.sum(0.25 * jnp.mean(p, axis=0)))
  np.testing.assert_allclose(out.losses["switch"], want, rtol=1e-6)
  np.testing.assert_allclose(want, 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------
# relu

def test_relu_gates_by_hand():
  # order relu: g = relu(z) = [1, 0, 2, 0]; experts 0 and 2 active with weights 1 and 2.
  router, x = _identity_gate("relu", [[1., -1., 2., 0.]], top_k=4, order="relu")
  out, state = _apply(router, x, _eye_params(4))
  plan = out.plan
  np.testing.assert_array_equal(plan.valid, [True, True, False, False])
  np.testing.assert_array_equal(plan.expert[:2], [2, 0])
  np.testing.assert_allclose(plan.weight, [2., 1., 0., 0.])
  assert float(out.metrics["token_sparsity"]) == 0.5 and float(out.metrics["capped"]) == 0
  # Sparsity loss lambda * mean_t sum_e g = 0.01 * 3.
  np.testing.assert_allclose(out.losses["sparsity"], 0.03, rtol=1e-6)
  np.testing.assert_allclose(state["routing"]["counts"], [2., 4.])
  # K_max = 1 keeps the larger gate and counts the cut one.
  router, _ = _identity_gate("relu", x, top_k=1, order="relu")
  out, _ = _apply(router, x, _eye_params(4))
  np.testing.assert_array_equal(out.plan.expert, [2])
  assert float(out.metrics["capped"]) == 1.0


def test_relu_rmsnorm_order_normalises_the_relu_output():
  # relu(z) = [3, 0, 4, 0]; rms = sqrt((9 + 16) / 4) = 2.5; g = [1.2, 0, 1.6, 0].
  router, x = _identity_gate("relu", [[3., -1., 4., 0.]], top_k=4, order="relu_rmsnorm")
  params = {**_eye_params(4), "gate_norm": {"scale": jnp.ones(4)}}
  plan = _apply(router, x, params)[0].plan
  np.testing.assert_allclose(plan.weight[:2], [1.6, 1.2], rtol=1e-4)


def test_a_zero_relu_gate_is_an_invalid_slot():
  x = jax.random.normal(jax.random.key(0), (64, 6))
  router = routers.create("relu", num_experts=6, top_k=6, order="rmsnorm_relu")
  variables = jit_init(router, jax.random.key(1), x)
  out, _ = router.apply(variables, x, mutable=["routing"])
  g = np.asarray(out.plan.weight)
  np.testing.assert_array_equal(np.asarray(out.plan.valid), g > 0)
  assert 0 < np.mean(g > 0) < 1


def test_chunk_sparsity_by_hand():
  # One sequence of 3 tokens, 2 experts, chunks of 2: chunk A = t0, t1; chunk B = t2
  # (+ one inactive pad). Expert 0 is active on t1 only, expert 1 on nothing:
  # pairs (A,0) used, (A,1), (B,0), (B,1) unused: 3 of 4 inactive.
  active = jnp.array([[[False, False], [True, False], [False, False]]])
  np.testing.assert_allclose(relu.chunk_sparsity(active, 2), 0.75)
  np.testing.assert_allclose(relu.chunk_sparsity(active, 1), 5 / 6)


def test_relu_l1_coefficient_follows_the_target():
  router = routers.create("relu", num_experts=4, top_k=4, target_sparsity=0.75,
                          sparsity_rate=2.0, l1_init=0.1)
  update = lambda counts: router.apply(
      {"params": {}, "routing": {"l1_coef": jnp.float32(0.1), "counts": counts}},
      method=router.update_state, mutable=["routing"])[1]["routing"]
  # Sparsity 0.5 < 0.75: lambda doubles; 0.9 > 0.75: halves; counts restart.
  np.testing.assert_allclose(update(jnp.array([2., 4.]))["l1_coef"], 0.2, rtol=1e-6)
  np.testing.assert_allclose(update(jnp.array([1., 10.]))["l1_coef"], 0.05, rtol=1e-6)
  np.testing.assert_allclose(update(jnp.array([1., 10.]))["counts"], [0., 0.])


# ---------------------------------------------------------------------------
# hash and random

def test_hash_depends_on_the_token_id_alone():
  router = routers.create("hash", num_experts=8, top_k=2)
  ids = jnp.array([[5, 9, 5, 1], [9, 5, 7, 5]])
  x1 = jax.random.normal(jax.random.key(0), (2, 4, 3))
  x2 = jax.random.normal(jax.random.key(1), (2, 4, 3))
  plan1 = router.apply({}, x1, RoutingContext(token_ids=ids)).plan
  plan2 = router.apply({}, x2, RoutingContext(token_ids=ids)).plan
  np.testing.assert_array_equal(plan1.expert, plan2.expert)
  experts = np.asarray(plan1.expert).reshape(8, 2)
  flat = np.asarray(ids).reshape(-1)
  for t in range(8):
    assert experts[t][0] != experts[t][1]
    for u in range(8):
      if flat[t] == flat[u]:
        np.testing.assert_array_equal(experts[t], experts[u])
  np.testing.assert_allclose(plan1.weight, 0.5)
  other_seed = routers.create("hash", num_experts=8, top_k=2, seed=1)
  ids_many = jnp.arange(64)
  a = router.apply({}, jnp.zeros((64, 3)), RoutingContext(token_ids=ids_many)).plan.expert
  b = other_seed.apply({}, jnp.zeros((64, 3)), RoutingContext(token_ids=ids_many)).plan.expert
  assert float(jnp.mean((a == b).astype(jnp.float32))) < 0.5
  # Each layer hashes differently.
  layer_1 = router.apply({}, jnp.zeros((64, 3)),
                         RoutingContext(token_ids=ids_many, layer=1)).plan.expert
  assert float(jnp.mean((a == layer_1).astype(jnp.float32))) < 0.5


def test_hash_needs_token_ids():
  router = routers.create("hash", num_experts=4)
  with pytest.raises(ValueError, match="token_ids"):
    router.apply({}, jnp.zeros((2, 3)), RoutingContext())


def _chi_square(counts):
  expected = counts.sum() / len(counts)
  return float(((counts - expected) ** 2 / expected).sum())


# chi-square, 7 degrees of freedom: P(X > 24.32) = 0.001.
CHI2_7_P001 = 24.32


@pytest.mark.parametrize("deterministic", [False, True])
def test_random_routing_is_uniform(deterministic):
  # Per-token draws (in training the default, per_batch, gives every token the
  # same experts: test_router_fidelity.py).
  router = routers.create("random", num_experts=8, top_k=2, draw="per_token")
  x = jnp.zeros((4000, 3))
  plan = router.apply({}, x, RoutingContext(layer=0), deterministic=deterministic,
                      rngs={"router": jax.random.key(0)}).plan
  counts = np.bincount(np.asarray(plan.expert), minlength=8)
  assert counts.sum() == 8000 and _chi_square(counts) < CHI2_7_P001
  pairs = np.asarray(plan.expert).reshape(4000, 2)
  assert np.all(pairs[:, 0] != pairs[:, 1])
  np.testing.assert_allclose(plan.weight, 0.5)


def test_hash_routing_is_uniform_over_token_ids():
  router = routers.create("hash", num_experts=8, top_k=2)
  plan = router.apply({}, jnp.zeros((4000, 3)),
                      RoutingContext(token_ids=jnp.arange(4000))).plan
  assert _chi_square(np.bincount(np.asarray(plan.expert), minlength=8)) < CHI2_7_P001


def test_random_routing_draws_afresh_in_training_and_is_fixed_in_evaluation():
  router = routers.create("random", num_experts=8, top_k=2, draw="per_token")
  x = jnp.zeros((64, 3))
  train = lambda i: router.apply({}, x, deterministic=False,
                                 rngs={"router": jax.random.key(i)}).plan.expert
  assert float(jnp.mean((train(0) == train(1)).astype(jnp.float32))) < 0.6
  evaluate = lambda layer: router.apply({}, x, RoutingContext(layer=layer)).plan.expert
  np.testing.assert_array_equal(evaluate(0), evaluate(0))
  assert float(jnp.mean((evaluate(0) == evaluate(1)).astype(jnp.float32))) < 0.6


def test_consistency_loss_by_hand():
  # p = [1/2, 1/2], q = [0.9, 0.1]: KL(p||q) = .5 ln(.5/.9) + .5 ln(.5/.1);
  # KL(q||p) = .9 ln(.9/.5) + .1 ln(.1/.5); the loss is their mean.
  p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
  kl = lambda a, b: float(np.sum(a * np.log(a / b)))
  want = 0.5 * (kl(p, q) + kl(q, p))
  got = hash_random.consistency_loss(jnp.log(jnp.asarray([p])), jnp.log(jnp.asarray([q])))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # The mask averages over the counted positions only.
  both = jnp.log(jnp.asarray([p, p])), jnp.log(jnp.asarray([q, p]))
  np.testing.assert_allclose(hash_random.consistency_loss(*both, jnp.array([True, False])),
                             want, rtol=1e-5)
  np.testing.assert_allclose(hash_random.consistency_loss(*both), want / 2, rtol=1e-5)


# ---------------------------------------------------------------------------
# soft

def test_soft_moe_matches_its_definition():
  """y = C f(D^T x) per sequence, computed with numpy loops over slots."""
  b, l, d, e, s = 2, 5, 6, 3, 2
  layer = MoE(num_experts=e, top_k=1, hidden_dim=4, router="soft", expert_type="mlp",
              activation="relu", router_kwargs={"slots_per_expert": s})
  x = jax.random.normal(jax.random.key(0), (b, l, d))
  variables = jit_init(layer, jax.random.key(1), x)
  y, aux = layer.apply(variables, x)
  params = variables["params"]
  phi = np.asarray(params["router"]["phi"].value, np.float64)
  wi = np.asarray(params["experts"]["wi"].value, np.float64)
  wo = np.asarray(params["experts"]["wo"].value, np.float64)
  xs = np.asarray(x, np.float64)
  want = np.zeros_like(xs)
  for i in range(b):
    logits = xs[i] @ phi                                            # [L, E*S]
    dispatch = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)
    combine = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    outs = []
    for slot in range(e * s):
      inp = dispatch[:, slot] @ xs[i]                               # [D]
      expert = slot // s
      outs.append(np.maximum(inp @ wi[expert], 0) @ wo[expert])
    want[i] = combine @ np.stack(outs)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(aux.metrics["experts_per_token"], e * s / l, rtol=1e-6)


def test_soft_slots_are_fixed_at_construction_and_slot_plan():
  """The parameters do not depend on the sequence length: initialised at L = 8 and
  applied at L = 16 (S = 1 by default: E * S = 4 rows per sequence)."""
  layer = MoE(num_experts=4, hidden_dim=8, router="soft",
              router_kwargs={"allow_noncausal": True})
  short, long = jnp.ones((2, 8, 6)), jnp.ones((2, 16, 6))
  variables = jit_init(layer, jax.random.PRNGKey(0), short)
  assert variables["params"]["router"]["phi"].unbox().shape == (6, 4)
  y, aux = layer.apply(variables, long)
  assert y.shape == (2, 16, 6)
  np.testing.assert_allclose(aux.metrics["experts_per_token"], 2 * 4 / 32)   # rows / tokens
  plan = slot_plan(2, 3, 2)
  np.testing.assert_array_equal(plan.expert, [0, 0, 1, 1, 2, 2] * 2)
  np.testing.assert_array_equal(plan.token, np.arange(12))


def test_soft_refuses_a_capacity_factor_and_erc():
  with pytest.raises(ValueError, match="capacity_factor"):
    MoE(num_experts=4, hidden_dim=4, router="soft", capacity_factor=1.0)
  with pytest.raises(ValueError, match="loss_weights.erc"):
    MoE(num_experts=4, hidden_dim=4, router="soft", loss_weights={"erc": 0.1})


# ---------------------------------------------------------------------------
# settings

@pytest.mark.parametrize("name,kwargs,field", [
    ("expert_choice", {"capacity_factor": 0.0}, "capacity_factor"),
    ("expert_choice", {"max_capacity": 0}, "max_capacity"),
    ("sinkhorn", {"iterations": 0}, "iterations"),
    ("sinkhorn", {"epsilon": -1.0}, "epsilon"),
    ("selective_sinkhorn", {"fraction": 1.5}, "fraction"),
    ("selective_sinkhorn", {"fraction_of": "rows"}, "fraction_of"),
    ("top_p", {"threshold": 0.0}, "threshold"),
    ("top_p", {"top_k": 9}, "top_k"),
    ("null_experts", {"num_null": 0}, "num_null"),
    ("null_experts", {"reference_k": 0}, "reference_k"),
    ("relu", {"order": "gelu"}, "order"),
    ("relu", {"target_sparsity": 1.0}, "target_sparsity"),
    ("relu", {"sparsity_rate": 0.5}, "sparsity_rate"),
    ("relu", {"chunk_size": 0}, "chunk_size"),
    ("random", {"consistency_weight": -1.0}, "consistency_weight"),
    ("hash", {"seed": -1}, "seed"),
    ("soft", {"slots_per_expert": 0}, "slots_per_expert"),
])
def test_bad_settings_name_their_field(name, kwargs, field):
  kwargs = {"num_experts": 8, "top_k": 2, **kwargs}
  with pytest.raises(ValueError, match=f"^{field}"):
    routers.create(name, **kwargs)
