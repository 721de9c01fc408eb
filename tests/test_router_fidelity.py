"""Routers as their papers define them: padding routed and counted nowhere, ReMoE's
L1 controller on the gates themselves, THOR's per-batch draw, AdaMoE's weights over
the true experts, DeepSeek's group scores, expert choice's capacity convention.

Padding is a token whose RoutingContext.segment_ids entry is 0. The contract:
its slots are invalid, and a padded batch gives its real tokens the plan, the
counts, the losses and the metrics of those real tokens alone.
"""
from __future__ import annotations

import functools
import math
import os

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import balance, routers
from moejax.core import RoutingContext
from moejax.routers import expert_choice, relu, sinkhorn
from tests.helpers import jit_init

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# Padding: the balance losses with a token mask, by hand.

# T = 5, E = 2, K = 1: the four real tokens of test_balance's intermediate case
# and one padding token on expert 0 with p = [1, 0].
#   real only: f = [3/4, 1/4], P = [.65, .35], L = 2 (.75 * .65 + .25 * .35) = 1.15
#   padding counted: f = [4/5, 1/5], P = [3.6/5, 1.4/5] = [.72, .28],
#                    L = 2 (.8 * .72 + .2 * .28) = 1.264
PAD_PROBS = jnp.array([[.9, .1], [.8, .2], [.3, .7], [.6, .4], [1.0, 0.0]])
PAD_EXPERTS = jnp.array([[0], [0], [1], [0], [0]])
PAD_REAL = jnp.array([True, True, True, True, False])


def test_switch_loss_leaves_padding_out_of_f_and_p():
  np.testing.assert_allclose(balance.switch_loss(PAD_PROBS, PAD_EXPERTS, 2), 1.264, rtol=1e-6)
  np.testing.assert_allclose(
      balance.switch_loss(PAD_PROBS, PAD_EXPERTS, 2, token_mask=PAD_REAL), 1.15, rtol=1e-6)
  # dL/dp_te = E f_e / T_real for real tokens, 0 for padding: 2 * [.75, .25] / 4.
  grad = jax.grad(lambda p: balance.switch_loss(p, PAD_EXPERTS, 2, token_mask=PAD_REAL))(
      PAD_PROBS)
  np.testing.assert_allclose(grad, [[.375, .125]] * 4 + [[0, 0]], rtol=1e-6)


# B = 3 rows of L = 3, E = 2, K = 1: test_balance's two sequences, each followed
# by a padding token, and a third row of padding only.
#   sequence scope: rows 0 and 1 as before (1.6 and 1.0), row 2 holds no real
#     token and is left out of the mean: (1.6 + 1.0) / 2 = 1.3
#   microbatch: f = [.75, .25], P = [.6, .4] over the 4 real tokens: 1.1
#   global with step counts [1, 3]: f = [.25, .75], P = [.6, .4]: 0.9
SEQ_PROBS = jnp.array([[[.9, .1], [.7, .3], [0., 1.]], [[.2, .8], [.6, .4], [0., 1.]],
                       [[0., 1.], [0., 1.], [0., 1.]]])
SEQ_EXPERTS = jnp.array([[[0], [0], [1]], [[1], [0], [1]], [[1], [1], [1]]])
SEQ_REAL = jnp.array([[True, True, False], [True, True, False], [False, False, False]])


@pytest.mark.parametrize("scope,kwargs,expected", [
    ("sequence", {}, 1.3),
    ("microbatch", {}, 1.1),
    ("global", {}, 1.1),
    ("global", {"global_counts": jnp.array([1.0, 3.0])}, 0.9),
])
def test_scoped_switch_loss_leaves_padding_out(scope, kwargs, expected):
  got = balance.scoped_switch_loss(SEQ_PROBS, SEQ_EXPERTS, 2, scope=scope,
                                   token_mask=SEQ_REAL, **kwargs)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_z_and_tsallis_losses_are_means_over_real_tokens():
  # z: rows [0, 0] and [log 3, 0] give lse log 2 and 2 log 2 (test_balance):
  # 2.5 (log 2)^2; the padding row [100, 100] (lse 100 + log 2) is left out.
  logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0], [100.0, 100.0]])
  real = jnp.array([True, True, False])
  np.testing.assert_allclose(balance.z_loss(logits, real), 2.5 * math.log(2) ** 2, rtol=1e-6)
  # Tsallis q = 2: rows uniform (.75) and collapsed (0), padding uniform: (.75 + 0) / 2.
  probs = jnp.array([[.25] * 4, [1.0, 0, 0, 0], [.25] * 4])
  np.testing.assert_allclose(balance.tsallis_loss(probs, 2.0, real), 0.375, rtol=1e-6)


def test_losses_of_a_batch_without_real_tokens_are_zero_with_zero_gradients():
  none = jnp.zeros((5,), bool)
  losses = {
      "switch": lambda p: balance.switch_loss(p, PAD_EXPERTS, 2, token_mask=none),
      "scoped": lambda p: balance.scoped_switch_loss(
          p.reshape(1, 5, 2), PAD_EXPERTS.reshape(1, 5, 1), 2, scope="sequence",
          token_mask=none.reshape(1, 5)),
      "z": lambda p: balance.z_loss(jnp.log(p + 1e-3), none),
      "tsallis": lambda p: balance.tsallis_loss(p, 0.5, none),
      "mean": lambda p: balance.token_mean(p[:, 0], none),
  }
  for name, loss in losses.items():
    value, grad = jax.value_and_grad(loss)(PAD_PROBS)
    assert float(value) == 0.0, name
    np.testing.assert_array_equal(grad, 0.0, err_msg=name)


def test_topk_does_not_route_or_count_padding():
  # The case: segment ids [1, 1, 0, 0], K = 2: slots of tokens 2 and 3
  # are invalid with weight 0, and `selected` counts 2 tokens * 2 = 4 selections.
  router = routers.create("topk", num_experts=4, top_k=2)
  x = jax.random.normal(jax.random.key(0), (1, 4, 3))
  variables = router.init(jax.random.key(1), x)
  out = router.apply(variables, x, RoutingContext(segment_ids=jnp.array([[1, 1, 0, 0]])))
  np.testing.assert_array_equal(out.plan.valid, [True] * 4 + [False] * 4)
  np.testing.assert_array_equal(out.plan.weight[4:], 0.0)
  assert float(jnp.sum(out.metrics["selected"])) == 4.0


def test_expert_choice_z_loss_and_unrouted_share_over_real_tokens():
  # logits rows z = x (W = I): t0 [3, 0], t1 [2, 0] (padding), t2 [1, 0]; K = 1,
  # C = ceil(4/3 * 3 * 1 / 2) = 2. Expert 0 takes t0, t2; expert 1 takes t2, t0:
  # every real token is routed (padding t1 is not a token to route): share 0.
  # z = (lse(3, 0)^2 + lse(1, 0)^2) / 2 with lse(a, 0) = log(1 + e^a).
  router = routers.create("expert_choice", num_experts=2, top_k=1, capacity_factor=4 / 3)
  x = jnp.array([[3., 0.], [2., 0.], [1., 0.]])
  ctx = RoutingContext(segment_ids=jnp.array([[1, 0, 1]]))
  out = router.apply({"params": {"gate": {"kernel": jnp.eye(2)}}}, x, ctx)
  assert float(out.metrics["unrouted_share"]) == 0.0
  lse = lambda a: math.log1p(math.exp(a))
  np.testing.assert_allclose(out.losses["z"], (lse(3) ** 2 + lse(1) ** 2) / 2, rtol=1e-6)


def test_relu_chunk_sparsity_cuts_chunks_from_the_real_tokens():
  # Row: t0 real (expert 0 on), t1 padding, t2 real (expert 1 on), t3 padding;
  # chunks of 2 from the real tokens alone: one chunk {t0, t2}, both experts
  # used: sparsity 0. Counting padding in place: chunks {t0, t1}, {t2, t3}, each
  # with one of two experts unused: 0.5.
  active = jnp.array([[[True, False], [False, False], [False, True], [False, False]]])
  real = jnp.array([[True, False, True, False]])
  np.testing.assert_allclose(relu.chunk_sparsity(active, 2), 0.5)
  np.testing.assert_allclose(relu.chunk_sparsity(active, 2, real), 0.0)
  assert float(relu.chunk_sparsity(active, 2, jnp.zeros_like(real))) == 0.0


# ---------------------------------------------------------------------------
# Padding: every tokens-choose router, padded batch vs its real tokens alone.

B, L, D, E = 2, 5, 5, 6
# name, kwargs, deterministic (random: its training draw; eval draws per token).
CASES = {
    "topk": ("topk", {"top_k": 2}, True),
    "topk-sequence": ("topk", {"top_k": 2, "balance_scope": "sequence"}, True),
    "topk-global": ("topk", {"top_k": 2, "balance_scope": "global"}, True),
    "topk-sigmoid-grouped-aux_free": ("topk", {"top_k": 2, "score": "sigmoid", "normalize": True,
                                               "num_groups": 3, "groups_selected": 2,
                                               "aux_free": True}, True),
    "topk-mixtral": ("topk", {"top_k": 2, "order": "topk_softmax",
                              "balance_scope": "sequence"}, True),
    "sinkhorn-train": ("sinkhorn", {"top_k": 2, "balance_scope": "global"}, False),
    "sinkhorn-eval": ("sinkhorn", {"top_k": 2}, True),
    "selective_sinkhorn-train": ("selective_sinkhorn", {"top_k": 2, "fraction": 1.0,
                                                        "balance_scope": "sequence"}, False),
    "top_p": ("top_p", {"top_k": 3, "threshold": 0.5, "normalize": True,
                        "balance_scope": "sequence"}, True),
    "null_experts": ("null_experts", {"top_k": 3, "num_null": 3}, True),
    "null_experts-all": ("null_experts", {"top_k": 3, "num_null": 3, "normalize_over": "all",
                                          "balance_scope": "global"}, True),
    "relu": ("relu", {"top_k": 2, "order": "relu", "chunk_size": 2,
                      "balance_scope": "sequence"}, True),
    "relu-rmsnorm": ("relu", {"top_k": 3, "chunk_size": 3}, True),
    "hash": ("hash", {"top_k": 2}, True),
    "random-train": ("random", {"top_k": 2}, False),
}


@functools.lru_cache(maxsize=None)
def _case(case):
  """(router, variables, jitted run(x, segment_ids, token_ids)) of a case."""
  name, kwargs, deterministic = CASES[case]
  router = routers.create(name, num_experts=E, **kwargs)
  x = jnp.zeros((B, L, D))
  ctx = RoutingContext(token_ids=jnp.zeros((B, L), jnp.int32))
  variables = jit_init(router, {"params": jax.random.key(1), "router": jax.random.key(2)}, x,
                       ctx, deterministic=deterministic)

  @jax.jit
  def run(variables, x, segment_ids, token_ids):
    ctx = RoutingContext(segment_ids=segment_ids, token_ids=token_ids)
    return router.apply(variables, x, ctx, deterministic=deterministic,
                        rngs={"router": jax.random.key(3)}, mutable=["routing"])
  return router, variables, run


def _inputs(seed):
  """x [B, L, D] whose padding would shift every loss, and token ids [B, L]."""
  x = jax.random.normal(jax.random.key(seed), (B, L, D))
  loud = 10.0 * jax.random.normal(jax.random.key(seed + 1), (B, L, D))
  ids = jax.random.randint(jax.random.key(seed + 2), (B, L), 0, 7)
  return x, loud, ids


def _alone(run, variables, x, ids):
  """The router on x [n, D] alone, as one row without padding."""
  return run(variables, x[None], None, ids[None])


@pytest.mark.parametrize("case", list(CASES))
# Ten cases, each example compiled anew (its real tokens' count): a third of the
# profile's examples each (ci: 4, thorough: 66).
@hypothesis.settings(max_examples=max(4, hypothesis.settings.default.max_examples // 3))
@hypothesis.given(segments=st.lists(st.integers(0, 2), min_size=B * L, max_size=B * L),
                  seed=st.integers(0, 2**16))
def test_padded_batch_routes_its_real_tokens_as_they_route_alone(case, segments, seed):
  """Plan, counts, losses (every balance scope), metrics and routing state of a
  padded batch equal those of its real tokens alone; padding slots are invalid."""
  segments = np.asarray(segments, np.int32).reshape(B, L)
  real = segments > 0
  hypothesis.assume(real.any())
  router, variables, run = _case(case)
  x, loud, ids = _inputs(seed)
  x = jnp.where(jnp.asarray(real)[..., None], x, loud)
  (out, state) = run(variables, x, jnp.asarray(segments), ids)
  flat_real = real.reshape(-1)
  (want, want_state) = _alone(run, variables, x.reshape(-1, D)[flat_real],
                              ids.reshape(-1)[flat_real])

  per_token = out.plan.num_slots // (B * L)
  plan = jax.tree_util.tree_map(lambda a: np.asarray(a).reshape(B * L, per_token), out.plan)
  ref = jax.tree_util.tree_map(lambda a: np.asarray(a).reshape(-1, per_token), want.plan)
  assert not plan.valid[~flat_real].any() and not plan.weight[~flat_real].any()
  np.testing.assert_array_equal(plan.valid[flat_real], ref.valid)
  np.testing.assert_array_equal(np.where(ref.valid, plan.expert[flat_real], -1),
                                np.where(ref.valid, ref.expert, -1))
  np.testing.assert_allclose(plan.weight[flat_real], ref.weight, rtol=1e-5, atol=1e-6)

  scope = (router.balance_scope if isinstance(router, routers.SwitchBalancedRouter)
           else "microbatch")
  lengths = [int(n) for n in real.sum(axis=1) if n > 0]           # rows with real tokens
  starts = np.cumsum([0] + lengths)
  assert set(out.losses) == set(want.losses) and set(out.metrics) == set(want.metrics)
  for name, value in out.losses.items():
    expected = want.losses[name]
    if name == "switch" and scope == "sequence":
      # Each row's real tokens as a sequence, with the selections and probs of
      # the batch without padding; averaged over the rows that hold any.
      expected = np.mean([balance.switch_loss(
          want.probs[a:b], ref.expert[a:b], want.probs.shape[-1], mask=ref.valid[a:b])
          for a, b in zip(starts[:-1], starts[1:])])
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=f"loss {name}")
  for name, value in out.metrics.items():
    expected = want.metrics[name]
    if name == "chunk_sparsity":                     # chunks of each row alone
      chunks = [math.ceil(n / router.chunk_size) for n in lengths]
      alone = [_alone(run, variables, x[b][real[b]], ids[b][real[b]])[0]
               for b in range(B) if real[b].any()]
      unused = sum(float(r.metrics["chunk_sparsity"]) * c for r, c in zip(alone, chunks))
      expected = unused / sum(chunks)
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=f"metric {name}")
  for got, expected in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(want_state)):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg="routing state")


@pytest.mark.parametrize("case", list(CASES))
def test_a_batch_of_padding_only_routes_nothing_and_stays_finite(case):
  """No valid slot, zero counts, finite losses and metrics with finite gradients."""
  router, variables, run = _case(case)
  x, _, ids = _inputs(0)
  padding = jnp.zeros((B, L), jnp.int32)
  out, state = run(variables, x, padding, ids)
  assert not bool(jnp.any(out.plan.valid)) and float(jnp.sum(jnp.abs(out.plan.weight))) == 0
  for name, value in {**out.losses, **out.metrics}.items():
    assert bool(jnp.all(jnp.isfinite(value))), name
  if "selected" in out.metrics:
    np.testing.assert_array_equal(out.metrics["selected"], 0.0)
  if "params" in variables and out.losses:
    def total(params):
      result, _ = run({**variables, "params": params}, x, padding, ids)
      return sum(jnp.sum(v) for v in result.losses.values())
    grads = jax.grad(total)(variables["params"])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


def test_sinkhorn_plan_leaves_padding_rows_out_of_the_marginals():
  # Rows 0..2 real, row 3 padding with huge logits for expert 0: the plan over
  # the real rows equals the plan of those rows alone (rows 1/3, columns 1/2),
  # and the padding row is log 0.
  logits = jnp.array([[1.0, 0.0], [0.5, 0.0], [0.0, 2.0], [50.0, 0.0]])
  real = jnp.array([True, True, True, False])
  got = sinkhorn.sinkhorn_log_plan(logits, 30, 1.0, real)
  want = sinkhorn.sinkhorn_log_plan(logits[:3], 30, 1.0)
  np.testing.assert_allclose(got[:3], want, rtol=1e-5)
  assert bool(jnp.all(jnp.isneginf(got[3])))
  np.testing.assert_allclose(jnp.exp(got[:3]).sum(axis=1), 1 / 3, rtol=1e-4)
  np.testing.assert_allclose(jnp.exp(got).sum(axis=0), 1 / 2, rtol=1e-5)
  assert float(sinkhorn.marginal_error(got, real)) < 1e-4


# ---------------------------------------------------------------------------
# ReLU routing: the L1 controller reads the gates' own sparsity.

def test_relu_controller_reads_gate_sparsity_before_the_cap():
  # E = 8, K_max = 2, order relu, one token with z = [5, 4, 3, 2, 1, -1, -2, -3]:
  # g = relu(z) opens 5 gates; the cap runs the 2 largest.
  #   gate sparsity (what ReMoE's controller reads): 3 / 8 = .375
  #   token sparsity after the cap: 6 / 8 = .75; capped: 5 - 2 = 3
  # Target .7, rate 1.2: .375 < .7, so lambda grows, .01 -> .012. Read after the
  # cap (.75 > .7) it would shrink to .01 / 1.2 = .00833 with 5 of 8 gates open.
  router = routers.create("relu", num_experts=8, top_k=2, order="relu", target_sparsity=0.7,
                          sparsity_rate=1.2, l1_init=0.01)
  x = jnp.array([[5., 4., 3., 2., 1., -1., -2., -3.]])
  variables = {"params": {"gate": {"kernel": jnp.eye(8)}},
               "routing": {"l1_coef": jnp.float32(0.01), "counts": jnp.zeros(2)}}
  out, state = router.apply(variables, x, mutable=["routing"])
  _, updated = router.apply({"params": variables["params"], **state},
                            method=router.update_state, mutable=["routing"])
  np.testing.assert_allclose(updated["routing"]["l1_coef"], 0.012, rtol=1e-6)
  np.testing.assert_allclose(state["routing"]["counts"], [5.0, 8.0])   # open gates, gates
  np.testing.assert_allclose(out.metrics["token_sparsity"], 0.75)
  assert float(out.metrics["capped"]) == 3.0
  np.testing.assert_allclose(out.metrics["gate_sparsity"], 0.375)


# ---------------------------------------------------------------------------
# THOR: one draw per batch in training, per token at evaluation.

def _chi_square(counts):
  expected = counts.sum() / len(counts)
  return float(((counts - expected) ** 2 / expected).sum())


def test_random_router_draws_one_expert_set_per_batch_by_default():
  router = routers.create("random", num_experts=8, top_k=1)
  assert router.draw == "per_batch"
  x = jnp.zeros((2, 16, 3))
  train = jax.jit(jax.vmap(lambda key: router.apply({}, x, deterministic=False,
                                                    rngs={"router": key}).plan.expert))
  experts = np.asarray(train(jax.random.split(jax.random.key(0), 800)))    # [800, T]
  # Within a call every token has the same expert (THOR: the layer's one expert) ...
  assert np.all(experts == experts[:, :1])
  # ... and over calls that expert is uniform: chi-square, 7 dof, P(> 24.32) = .001.
  assert _chi_square(np.bincount(experts[:, 0], minlength=8)) < 24.32
  # K = 2: the same two distinct experts for every token, weights 1/2.
  pair = routers.create("random", num_experts=8, top_k=2).apply(
      {}, x, deterministic=False, rngs={"router": jax.random.key(1)}).plan
  slots = np.asarray(pair.expert).reshape(32, 2)
  assert np.all(slots == slots[:1]) and slots[0, 0] != slots[0, 1]
  np.testing.assert_allclose(pair.weight, 0.5)


def test_random_router_per_token_draw_and_evaluation():
  x = jnp.zeros((64, 3))
  per_token = routers.create("random", num_experts=8, top_k=1, draw="per_token")
  train = per_token.apply({}, x, deterministic=False, rngs={"router": jax.random.key(0)})
  assert len(set(np.asarray(train.plan.expert).tolist())) > 1
  # Evaluation draws per token from the fixed key (seed, layer), whatever `draw`.
  per_batch = routers.create("random", num_experts=8, top_k=1)
  a = per_batch.apply({}, x, RoutingContext(layer=1)).plan.expert
  b = per_token.apply({}, x, RoutingContext(layer=1)).plan.expert
  np.testing.assert_array_equal(a, b)
  assert len(set(np.asarray(a).tolist())) > 1
  with pytest.raises(ValueError, match="^draw"):
    routers.create("random", num_experts=8, draw="per_layer")


# ---------------------------------------------------------------------------
# AdaMoE: combine weights renormalised over the true experts.

def test_null_experts_renormalise_over_true_experts_by_default():
  # E = 2 true experts (0, 1), N = 2 nulls (2, 3), K = 2, logits = x.
  #   t0 = [2, 1, 0, 0]: experts 0 and 1, both true: p0 / (p0 + p1) = 1 / (1 + e^-1)
  #   t1 = [0, 1, 3, 0]: null 2, then expert 1: AdaMoE gives expert 1 all the
  #     weight, 1; renormalising over all K (normalize_over='all') gives it
  #     e^1 / (e^1 + e^3) = 1 / (1 + e^2) and leaves the null's mass unused.
  #   t2 = [0, 0, 3, 3]: both nulls: no valid slot, weights 0 (no 0 / 0).
  x = jnp.array([[2., 1., 0., 0.], [0., 1., 3., 0.], [0., 0., 3., 3.]])
  params = {"params": {"scores": {"gate": {"kernel": jnp.eye(4)}}}}
  default = routers.create("null_experts", num_experts=2, num_null=2, top_k=2)
  plan = default.apply(params, x).plan
  s = lambda a: 1 / (1 + math.exp(-a))
  np.testing.assert_array_equal(plan.valid, [True, True, False, True, False, False])
  np.testing.assert_allclose(plan.weight, [s(1), 1 - s(1), 0, 1, 0, 0], rtol=1e-6)
  assert default.normalize_over == "true_experts"
  every = routers.create("null_experts", num_experts=2, num_null=2, top_k=2,
                         normalize_over="all").apply(params, x).plan
  np.testing.assert_allclose(every.weight, [s(1), 1 - s(1), 0, s(-2), 0, 0], rtol=1e-6)
  with pytest.raises(ValueError, match="^normalize_over"):
    routers.create("null_experts", num_experts=2, normalize_over="nulls")


# ---------------------------------------------------------------------------
# Group-limited top-k: DeepSeek-V2 (max) and V3 (top-2 sum) group scores.

def _route_logits(router, logits):
  logits = np.asarray(logits, np.float32)
  num_experts = logits.shape[1]
  kernel = np.zeros((num_experts, num_experts), np.float32)
  kernel[:logits.shape[0]] = logits
  x = jnp.asarray(np.eye(num_experts, dtype=np.float32)[None, :logits.shape[0]])
  return router.apply({"params": {"gate": {"kernel": jnp.asarray(kernel)}}}, x)


# E = 12 in 4 groups of 3, logits log(n) with sum(n) = 100, so p = n / 100.
#   g0 [22, 2, 1]    max .22  top-2 .24  top-3 .25
#   g1 [15, 14, 1]   max .15  top-2 .29  top-3 .30
#   g2 [12, 11, 11]  max .12  top-2 .23  top-3 .34
#   g3 [4, 4, 3]     max .04  top-2 .08  top-3 .11
# K = 3, G_sel = 1 (share_sum sums ceil(3 / 1) = 3):
#   max       -> g0: e0 .22, e1 .02, e2 .01
#   top2_sum  -> g1: e3 .15, e4 .14, e5 .01
#   share_sum -> g2: e6 .12, e7 .11, e8 .11 (a tie: the lower index first)
#   (global top-3: e0, e3, e4)
GROUP_COUNTS = np.array([[22, 2, 1, 15, 14, 1, 12, 11, 11, 4, 4, 3]], np.float64)


@pytest.mark.parametrize("group_score,experts,weights", [
    ("max", [0, 1, 2], [.22, .02, .01]),
    ("top2_sum", [3, 4, 5], [.15, .14, .01]),
    ("share_sum", [6, 7, 8], [.12, .11, .11]),
])
def test_group_scores_by_hand(group_score, experts, weights):
  router = routers.create("topk", num_experts=12, top_k=3, num_groups=4, groups_selected=1,
                          group_score=group_score)
  out = _route_logits(router, np.log(GROUP_COUNTS))
  np.testing.assert_array_equal(out.plan.expert, experts)
  np.testing.assert_allclose(out.plan.weight, weights, rtol=1e-5)


def test_group_score_defaults_to_deepseek_v3_and_is_checked():
  assert routers.create("topk", num_experts=8).group_score == "top2_sum"
  with pytest.raises(ValueError, match="^group_score"):
    routers.create("topk", num_experts=8, num_groups=4, groups_selected=2, group_score="mean")


# ---------------------------------------------------------------------------
# Expert choice: capacity_factor and Zhou et al.'s c.

def test_expert_choice_capacity_is_zhou_et_al_with_c_equal_cf_times_k():
  # Zhou et al.: each expert takes k = n c / e tokens. Ours: C = cf T K / E, so
  # c = cf K: T = 64, E = 8, their c = 2 is cf 1 with K = 2 (16 tokens each) and
  # cf 2 with K = 1.
  assert expert_choice.expert_capacity(64, 2, 8, 1.0) == 64 * 2 // 8 == 16
  assert expert_choice.expert_capacity(64, 1, 8, 2.0) == 16
  assert "c = capacity_factor * K" in expert_choice.__doc__
  readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  row = next(line for line in readme.splitlines() if line.startswith("| `expert_choice` |"))
  assert "c = cf·K" in row


def test_layer_capacity_on_an_expert_choice_plan_keeps_every_slot_it_has_room_for():
  # E = 4, T = 16, K = 1, router cf 0.75: each expert takes ceil(0.75 * 16 / 4) = 3
  # tokens, 12 slots. The layer's C = ceil(2.0 * 12 / 4) = 6 >= 3: nothing drops.
  # (Slots per token as 12 // 16 = 0 gave C = 0 and dropped 8 of the 12.)
  from moejax import MoE  # pylint: disable=g-import-not-at-top
  layer = MoE(num_experts=4, hidden_dim=8, top_k=1, router="expert_choice",
              router_kwargs={"capacity_factor": 0.75}, capacity_factor=2.0)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8))
  (_, aux), _ = layer.init_with_output(jax.random.PRNGKey(1), x)
  assert aux.plan.num_slots == 12
  assert float(aux.metrics["dropped"]) == 0.0
  assert int(np.sum(aux.plan.valid)) == 12
  # At C = 2 < 3 each expert keeps 2 of its 3 tokens: 4 of 12 drop.
  tight = layer.clone(capacity_factor=2 * 4 / 12)
  (_, aux), _ = tight.init_with_output(jax.random.PRNGKey(1), x)
  assert float(aux.metrics["dropped"]) == 4.0
