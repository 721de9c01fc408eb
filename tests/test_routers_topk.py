"""Hand-computed cases of the top-K router (moejax/routers/topk.py).

Most cases route T = 3 tokens to E = 4 experts. The input rows are rows of the
identity, x_t = e_t (D = E), so the logits z = x W_g are exactly the first T rows
of the gate kernel, which the tests set to chosen numbers. Logits of the form
log(n) give softmax probabilities n / sum(n), and logits log(a / b) give sigmoid
scores a / (a + b), so every expected number below is a small fraction.

Plans of tokens-choose routers are flat: slot a = t * K + k, token[a] = t, and
k = 0 is the token's best expert.
"""
import math

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import balance, routers
from moejax.routers.topk import TopKRouter

LN2 = math.log(2.0)


def _route(router, logits, *, x_dtype=jnp.float32, deterministic=True, rngs=None):
  """Applies `router` to identity rows x_t = e_t with gate kernel rows = logits.

  Args:
    router: an unbound router with num_experts = E.
    logits: [T, E] with T <= E, the logits z = x W_g the router must see.
    x_dtype: dtype of x.
    deterministic: passed to the router.
    rngs: passed to apply.

  Returns:
    The RouterOutput.
  """
  logits = np.asarray(logits, np.float32)
  num_tokens, num_experts = logits.shape
  x = jnp.asarray(np.eye(num_experts, dtype=np.float32)[None, :num_tokens], x_dtype)
  kernel = np.zeros((num_experts, num_experts), np.float32)
  kernel[:num_tokens] = logits
  return router.apply({"params": _params(router, kernel)}, x, deterministic=deterministic,
                      rngs=rngs)


def _params(router, gate_kernel):
  """The router's params with gate kernel `gate_kernel` [D, E], built by hand.

  Building them skips `init` (an eager forward pass that is slow on CPU); the
  tree is checked against `init` in test_param_tree_matches_init. The noise
  kernel of a noisy router is zero, its initial value.
  """
  params = {"gate": {"kernel": jnp.asarray(gate_kernel, jnp.float32)}}
  if router.noisy:
    params["noise"] = {"kernel": jnp.zeros(gate_kernel.shape, jnp.float32)}
  return params


def _expected_plan(expert_index):
  """Token and expert arrays of a tokens-choose plan with slot a = t * K + k."""
  expert_index = np.asarray(expert_index)
  num_tokens, k = expert_index.shape
  return np.repeat(np.arange(num_tokens), k), expert_index.reshape(-1)


def _assert_plan(out, expert_index, weights, rtol=1e-6):
  """Checks plan layout, experts [T, K] and weights [T, K] of a RouterOutput."""
  token, expert = _expected_plan(expert_index)
  np.testing.assert_array_equal(out.plan.token, token)
  np.testing.assert_array_equal(out.plan.expert, expert)
  np.testing.assert_allclose(out.plan.weight, np.asarray(weights).reshape(-1),
                             rtol=rtol, atol=1e-7)
  assert out.plan.valid.dtype == jnp.bool_ and bool(jnp.all(out.plan.valid))
  assert out.plan.token.dtype == jnp.int32 and out.plan.expert.dtype == jnp.int32
  assert out.plan.weight.dtype == jnp.float32


# Softmax case. Logits z_t = log(n_t), so p_t = n_t / sum(n_t):
#   t0: n = [1, 4, 2, 1]  / 8   p = [.125, .5,  .25, .125]  top-2: e1 (.5),  e2 (.25)
#   t1: n = [6, 1, 1, 2]  / 10  p = [.6,   .1,  .1,  .2]    top-2: e0 (.6),  e3 (.2)
#   t2: n = [2, 5, 1, 12] / 20  p = [.1,   .25, .05, .6]    top-2: e3 (.6),  e1 (.25)
SOFTMAX_COUNTS = np.array([[1, 4, 2, 1], [6, 1, 1, 2], [2, 5, 1, 12]], np.float64)
SOFTMAX_LOGITS = np.log(SOFTMAX_COUNTS)
SOFTMAX_PROBS = np.array([[.125, .5, .25, .125], [.6, .1, .1, .2], [.1, .25, .05, .6]])
SOFTMAX_EXPERTS = [[1, 2], [0, 3], [3, 1]]


def test_names_contains_topk():
  assert "topk" in routers.names()
  assert routers.get("topk") is TopKRouter
  assert {"num_experts", "top_k", "score", "order", "normalize", "scale", "noisy",
          "jitter", "num_groups", "groups_selected"} <= set(routers.fields("topk"))
  assert isinstance(routers.create("topk", num_experts=4, top_k=2), TopKRouter)


def test_param_tree_matches_init():
  router = routers.create("topk", num_experts=4, top_k=2, noisy=True)
  x = jnp.ones((1, 3, 6), jnp.float32)
  abstract = jax.eval_shape(lambda: router.init(jax.random.key(0), x))["params"]
  assert isinstance(abstract["gate"]["kernel"], nn.LogicallyPartitioned)
  assert abstract["gate"]["kernel"].names == ("embed", None)
  unboxed = nn.meta.unbox(abstract)
  mine = _params(router, np.zeros((6, 4), np.float32))
  assert jax.tree_util.tree_structure(unboxed) == jax.tree_util.tree_structure(mine)
  for a, b in zip(jax.tree_util.tree_leaves(unboxed), jax.tree_util.tree_leaves(mine)):
    assert a.shape == b.shape == (6, 4) and a.dtype == b.dtype == jnp.float32


def test_softmax_topk_without_normalize():
  router = routers.create("topk", num_experts=4, top_k=2)
  out = _route(router, SOFTMAX_LOGITS)
  # Weights are the selected probabilities themselves.
  _assert_plan(out, SOFTMAX_EXPERTS, [[.5, .25], [.6, .2], [.6, .25]])
  np.testing.assert_allclose(out.probs, SOFTMAX_PROBS, rtol=1e-6)
  np.testing.assert_allclose(out.logits, SOFTMAX_LOGITS, rtol=1e-6)


def test_softmax_topk_with_normalize():
  router = routers.create("topk", num_experts=4, top_k=2, normalize=True)
  out = _route(router, SOFTMAX_LOGITS)
  # Selected probabilities over their sum:
  #   t0: .5 / .75 = 2/3, .25 / .75 = 1/3
  #   t1: .6 / .8  = 3/4, .2  / .8  = 1/4
  #   t2: .6 / .85 = 12/17, .25 / .85 = 5/17
  _assert_plan(out, SOFTMAX_EXPERTS, [[2 / 3, 1 / 3], [3 / 4, 1 / 4], [12 / 17, 5 / 17]])
  np.testing.assert_allclose(out.probs, SOFTMAX_PROBS, rtol=1e-6)


def test_softmax_router_losses_by_hand():
  router = routers.create("topk", num_experts=4, top_k=2)
  out = _route(router, SOFTMAX_LOGITS)
  # f: selections e1 e2 | e0 e3 | e3 e1 -> counts [1, 2, 1, 2] / (T K = 6).
  # P = column means of p: [.825, .85, .4, .925] / 3.
  # switch = E sum f P = 4 (1*.825 + 2*.85 + 1*.4 + 2*.925) / 18 = 4 * 4.775 / 18.
  np.testing.assert_allclose(out.losses["switch"], 4 * 4.775 / 18, rtol=1e-6)
  # logsumexp(log n_t) = log(sum n_t) = log 8, log 10, log 20.
  z = (math.log(8) ** 2 + math.log(10) ** 2 + math.log(20) ** 2) / 3
  np.testing.assert_allclose(out.losses["z"], z, rtol=1e-6)


# Mixtral case: raw logits, top-2 on z, then softmax over the 2 selected logits.
#   t0: z = [ 2.0, 1.0,  0.5, -1.0]  top-2: e0 (2.0), e1 (1.0)
#       w = [1, e^-1] / (1 + e^-1)       = [.7310586, .2689414]
#   t1: z = [ 0.0, 3.0,  2.5,  2.9]  top-2: e1 (3.0), e3 (2.9)
#       w = [1, e^-0.1] / (1 + e^-0.1)   = [.5249792, .4750208]
#   t2: z = [-1.0, -2.0, -0.5, -3.0] top-2: e2 (-0.5), e0 (-1.0)
#       w = [1, e^-0.5] / (1 + e^-0.5)   = [.6224593, .3775407]
MIXTRAL_LOGITS = np.array([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 2.5, 2.9],
                           [-1.0, -2.0, -0.5, -3.0]])


def _two_way_softmax(gap):
  """softmax([0, -gap]) = [1, e^-gap] / (1 + e^-gap)."""
  return [1 / (1 + math.exp(-gap)), math.exp(-gap) / (1 + math.exp(-gap))]


@pytest.mark.parametrize("normalize", [False, True])
def test_topk_softmax_mixtral(normalize):
  router = routers.create("topk", num_experts=4, top_k=2, order="topk_softmax",
                          normalize=normalize)
  out = _route(router, MIXTRAL_LOGITS)
  weights = [_two_way_softmax(1.0), _two_way_softmax(0.1), _two_way_softmax(0.5)]
  np.testing.assert_allclose(weights, [[.7310586, .2689414], [.5249792, .4750208],
                                       [.6224593, .3775407]], rtol=1e-6)
  _assert_plan(out, [[0, 1], [1, 3], [2, 0]], weights)
  # probs stay the softmax over all E logits, not over the selected ones.
  full = np.exp(MIXTRAL_LOGITS) / np.exp(MIXTRAL_LOGITS).sum(-1, keepdims=True)
  np.testing.assert_allclose(out.probs, full, rtol=1e-6)
  # softmax_topk (unnormalised) weights differ: t0 gets p = e^2 / sum e^z.
  assert abs(float(out.plan.weight[0]) - full[0, 0]) > 0.1


# Sigmoid case. z = log(a / b) gives s = sigmoid(z) = a / (a + b):
#   t0: s = [.9, .2, .75, .5]   z = [log 9, log 1/4, log 3, 0]    top-2: e0, e2
#   t1: s = [.1, .8, .5, .25]   z = [log 1/9, log 4, 0, log 1/3]  top-2: e1, e2
#   t2: s = [.25, .2, .1, .5]   z = [log 1/3, log 1/4, log 1/9, 0] top-2: e3, e0
SIGMOID_SCORES = np.array([[.9, .2, .75, .5], [.1, .8, .5, .25], [.25, .2, .1, .5]])
SIGMOID_LOGITS = np.log(SIGMOID_SCORES / (1 - SIGMOID_SCORES))
SIGMOID_EXPERTS = [[0, 2], [1, 2], [3, 0]]
SIGMOID_RAW = np.array([[.9, .75], [.8, .5], [.5, .25]])
# Normalised: t0 .9/1.65 = 6/11, .75/1.65 = 5/11; t1 .8/1.3 = 8/13, 5/13;
#             t2 .5/.75 = 2/3, 1/3.
SIGMOID_NORMALIZED = np.array([[6 / 11, 5 / 11], [8 / 13, 5 / 13], [2 / 3, 1 / 3]])


@pytest.mark.parametrize("normalize,scale,weights", [
    (False, 1.0, SIGMOID_RAW),
    (True, 1.0, SIGMOID_NORMALIZED),
    (False, 2.5, 2.5 * SIGMOID_RAW),          # t0: 2.5 * .9 = 2.25, 2.5 * .75 = 1.875
    (True, 2.5, 2.5 * SIGMOID_NORMALIZED),    # t0: 2.5 * 6/11 = 15/11
])
def test_sigmoid(normalize, scale, weights):
  router = routers.create("topk", num_experts=4, top_k=2, score="sigmoid",
                          normalize=normalize, scale=scale)
  out = _route(router, SIGMOID_LOGITS)
  _assert_plan(out, SIGMOID_EXPERTS, weights)
  # The balance distribution is s / sum(s): row sums 2.35, 1.65, 1.05.
  np.testing.assert_allclose(out.probs, SIGMOID_SCORES / np.array([[2.35], [1.65], [1.05]]),
                             rtol=1e-6)


def test_scale_multiplies_softmax_weights():
  router = routers.create("topk", num_experts=4, top_k=2, normalize=True, scale=3.0)
  out = _route(router, SOFTMAX_LOGITS)
  # 3 * normalised weights: t0 3 * 2/3 = 2, 3 * 1/3 = 1; t1 2.25, .75; t2 36/17, 15/17.
  _assert_plan(out, SOFTMAX_EXPERTS, [[2.0, 1.0], [2.25, .75], [36 / 17, 15 / 17]])


# Group-limited selection. Logits log(n) with sum(n) = 100, so p = n / 100.
# E = 8 in 4 groups of 2: g0 = {e0, e1}, g1 = {e2, e3}, g2 = {e4, e5}, g3 = {e6, e7}.
GROUP8_COUNTS = np.array([
    [30, 1, 18, 17, 20, 2, 10, 2],
    [16, 15, 14, 13, 25, 1, 8, 8],
], np.float64)


def test_group_limited_k3_two_groups():
  # K = 3, G_sel = 2, group_score top2_sum (the default, DeepSeek-V3): a group's
  # score is the sum of its 2 best p (here its whole pair; share_sum's
  # ceil(3 / 2) = 2 is the same).
  # t0: g0 = .30+.01 = .31, g1 = .18+.17 = .35, g2 = .22, g3 = .12 -> g1, g0
  #     top-3 of {e0 .30, e1 .01, e2 .18, e3 .17} = e0, e2, e3.
  #     (Global top-3 would be e0, e4, e2; a max-per-group rule would keep g0, g2.)
  # t1: g0 = .31, g1 = .27, g2 = .26, g3 = .16 -> g0, g1
  #     top-3 of {e0 .16, e1 .15, e2 .14, e3 .13} = e0, e1, e2; the global best
  #     expert, e4 (.25), is excluded.
  router = routers.create("topk", num_experts=8, top_k=3, num_groups=4, groups_selected=2)
  out = _route(router, np.log(GROUP8_COUNTS))
  _assert_plan(out, [[0, 2, 3], [0, 1, 2]], [[.30, .18, .17], [.16, .15, .14]])
  # probs are not renormalised over the kept groups.
  np.testing.assert_allclose(out.probs, GROUP8_COUNTS / 100, rtol=1e-6)


def test_group_limited_k2_one_group():
  # K = 2, G_sel = 1: group score = sum of its 2 best p (top2_sum, the default).
  # t0: g1 (.35) wins over g0 (.31) -> e2 (.18), e3 (.17), though e0 (.30) and
  #     e4 (.20) are the global top-2.
  # t1: g0 (.31) wins -> e0 (.16), e1 (.15).
  router = routers.create("topk", num_experts=8, top_k=2, num_groups=4, groups_selected=1)
  out = _route(router, np.log(GROUP8_COUNTS))
  _assert_plan(out, [[2, 3], [0, 1]], [[.18, .17], [.16, .15]])


@pytest.mark.parametrize("group_score", ["max", "share_sum"])
def test_group_limited_k2_two_groups_uses_group_max(group_score):
  # K = 2, G_sel = 2, group_score max (DeepSeek-V2), or share_sum with
  # ceil(2 / 2) = 1: a group's score is its best p.
  # t0: g0 .30, g1 .18, g2 .20, g3 .10 -> g0, g2 -> top-2 of {e0, e1, e4, e5} = e0, e4.
  # t1: g0 .16, g1 .14, g2 .25, g3 .08 -> g2, g0 -> e4 (.25), e0 (.16).
  router = routers.create("topk", num_experts=8, top_k=2, num_groups=4, groups_selected=2,
                          group_score=group_score)
  out = _route(router, np.log(GROUP8_COUNTS))
  _assert_plan(out, [[0, 4], [4, 0]], [[.30, .20], [.25, .16]])


def test_group_limited_k2_two_groups_default_uses_top2_sum():
  # The same case with the default top2_sum (DeepSeek-V3): the sum of 2 best p.
  # t0: g0 .31, g1 .35, g2 .22, g3 .12 -> g1, g0 -> top-2 of {e0 .30, e1, e2 .18, e3}
  #     = e0, e2 (max would keep g2's e4, .20, instead of e2).
  # t1: g0 .31, g1 .27, g2 .26, g3 .16 -> g0, g1 -> e0 (.16), e1 (.15); the
  #     global best, e4 (.25), is excluded.
  router = routers.create("topk", num_experts=8, top_k=2, num_groups=4, groups_selected=2)
  out = _route(router, np.log(GROUP8_COUNTS))
  _assert_plan(out, [[0, 2], [0, 1]], [[.30, .18], [.16, .15]])


def test_group_limited_top2_of_three():
  # E = 12 in 4 groups of 3, K = 3, G_sel = 2: group score = sum of its 2 best p
  # (top2_sum, the default).
  #   n = [30, 1, 1 | 14, 11, 11 | 15, 13, 1 | 1, 1, 1], sum 100.
  #   top-2 sums: g0 = .31, g1 = .25, g2 = .28, g3 = .02 -> g0, g2
  #   top-3 of {e0 .30, e1, e2 .01, e6 .15, e7 .13, e8 .01} = e0, e6, e7.
  #   (Global top-3: e0, e6, e3 (.14). Summing whole groups would keep g1 (.36)
  #   and g0 (.32) instead.)
  counts = np.array([[30, 1, 1, 14, 11, 11, 15, 13, 1, 1, 1, 1]], np.float64)
  router = routers.create("topk", num_experts=12, top_k=3, num_groups=4, groups_selected=2)
  out = _route(router, np.log(counts))
  _assert_plan(out, [[0, 6, 7]], [[.30, .15, .13]])


def test_group_limited_topk_softmax_scores_groups_by_logits():
  # order='topk_softmax' selects on logits z = log n, so a group's score is
  # log(n_a) + log(n_b) = log(n_a n_b).
  # t0: products g0 = 30, g1 = 18*17 = 306, g2 = 40, g3 = 20 -> g1, g2
  #     top-3 of {e2 18, e3 17, e4 20, e5 2} = e4, e2, e3,
  #     weights softmax(log [20, 18, 17]) = [20, 18, 17] / 55.
  #     (Summing probabilities instead keeps g1, g0: e0, e2, e3.)
  # t1: products g0 = 16*15 = 240, g1 = 14*13 = 182, g2 = 25, g3 = 64 -> g0, g1
  #     top-3 of {e0 16, e1 15, e2 14, e3 13} = e0, e1, e2, weights [16, 15, 14] / 45.
  router = routers.create("topk", num_experts=8, top_k=3, order="topk_softmax",
                          num_groups=4, groups_selected=2)
  out = _route(router, np.log(GROUP8_COUNTS))
  _assert_plan(out, [[4, 2, 3], [0, 1, 2]],
               [[20 / 55, 18 / 55, 17 / 55], [16 / 45, 15 / 45, 14 / 45]])


# Training noise.
NOISE_LOGITS = np.array([[1.0, -2.0, 0.5, 3.0], [2.0, 1.5, -1.0, 0.25],
                         [-0.5, 4.0, 1.0, 2.0]])


@pytest.mark.parametrize("settings", [{"noisy": True}, {"jitter": 0.1},
                                      {"noisy": True, "jitter": 0.1}])
def test_deterministic_needs_no_rng_and_is_clean(settings):
  router = routers.create("topk", num_experts=4, top_k=2, **settings)
  clean = _route(routers.create("topk", num_experts=4, top_k=2), NOISE_LOGITS)
  a = _route(router, NOISE_LOGITS, deterministic=True)
  b = _route(router, NOISE_LOGITS, deterministic=True)
  np.testing.assert_array_equal(a.logits, NOISE_LOGITS.astype(np.float32))
  np.testing.assert_array_equal(a.logits, b.logits)
  np.testing.assert_array_equal(a.plan.weight, clean.plan.weight)
  np.testing.assert_array_equal(a.plan.expert, clean.plan.expert)
  assert router.uses_rng


@pytest.mark.parametrize("settings", [{"noisy": True}, {"jitter": 0.1}])
def test_training_noise_changes_logits_and_is_reproducible(settings):
  router = routers.create("topk", num_experts=4, top_k=2, **settings)
  key, other = jax.random.key(1), jax.random.key(2)
  a = _route(router, NOISE_LOGITS, deterministic=False, rngs={"router": key})
  b = _route(router, NOISE_LOGITS, deterministic=False, rngs={"router": key})
  c = _route(router, NOISE_LOGITS, deterministic=False, rngs={"router": other})
  np.testing.assert_array_equal(a.logits, b.logits)
  np.testing.assert_array_equal(a.plan.weight, b.plan.weight)
  assert float(jnp.max(jnp.abs(a.logits - NOISE_LOGITS))) > 1e-3
  assert float(jnp.max(jnp.abs(a.logits - c.logits))) > 1e-3


def test_training_noise_needs_router_rng():
  router = routers.create("topk", num_experts=4, top_k=2, noisy=True)
  with pytest.raises(Exception, match="router"):
    _route(router, NOISE_LOGITS, deterministic=False)


def test_jitter_scales_each_input_row():
  # With x_t = e_t, jitter gives x_t * u_t, so z_t = u_tt W_t: every logit of a
  # row is multiplied by the same factor u_tt in [1 - j, 1 + j] = [.9, 1.1].
  router = routers.create("topk", num_experts=4, top_k=2, jitter=0.1)
  out = _route(router, NOISE_LOGITS, deterministic=False, rngs={"router": jax.random.key(3)})
  ratio = np.asarray(out.logits) / NOISE_LOGITS
  np.testing.assert_allclose(ratio, ratio[:, :1].repeat(4, axis=1), rtol=1e-5)
  assert np.all((ratio >= 0.9) & (ratio <= 1.1))
  assert np.max(np.abs(ratio - 1)) > 1e-4


def test_noisy_gating_noise_std_is_softplus_zero():
  # W_noise starts at zero, so z_noisy - z = softplus(0) * eps = ln 2 * eps with
  # eps ~ N(0, 1): over 1024 * 4 draws the sample mean is within 0.05 of 0 and
  # the sample std within 0.05 of 1 (standard errors ~0.016 and ~0.011).
  router = routers.create("topk", num_experts=4, top_k=2, noisy=True)
  x = np.random.default_rng(5).normal(size=(1, 1024, 4)).astype(np.float32)
  params = _params(router, np.random.default_rng(4).normal(size=(4, 4)))

  @jax.jit
  def noise(params, x, key):
    clean = router.apply({"params": params}, x, deterministic=True)
    noisy = router.apply({"params": params}, x, deterministic=False, rngs={"router": key})
    return noisy.logits - clean.logits

  eps = np.asarray(noise(params, x, jax.random.key(6))) / LN2
  assert abs(eps.mean()) < 0.05
  assert abs(eps.std() - 1.0) < 0.05


@pytest.mark.parametrize("settings", [{}, {"score": "sigmoid", "normalize": True},
                                      {"order": "topk_softmax"}])
def test_router_math_is_float32_for_bfloat16_input(settings):
  # x = e_t is exact in bfloat16; the kernel entries are not (bfloat16 keeps 8
  # significant bits), so the logits equal them exactly only if z = x W runs in
  # float32.
  logits = np.array([[0.1234567, -1.2345678, 0.7654321, 0.3333333],
                     [1.0000001, 0.9999999, -0.4444444, 0.1111111],
                     [-0.2718281, 0.3141592, 0.5772156, -0.6931471]], np.float32)
  assert not np.array_equal(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32), logits)
  router = routers.create("topk", num_experts=4, top_k=2, **settings)
  low = _route(router, logits, x_dtype=jnp.bfloat16)
  full = _route(router, logits, x_dtype=jnp.float32)
  for arr in (low.logits, low.probs, low.plan.weight, low.losses["switch"], low.losses["z"]):
    assert arr.dtype == jnp.float32
  np.testing.assert_array_equal(low.logits, logits)
  np.testing.assert_array_equal(low.probs, full.probs)
  np.testing.assert_array_equal(low.plan.weight, full.plan.weight)
  np.testing.assert_array_equal(low.plan.expert, full.plan.expert)


def _jitted_router(score):
  router = routers.create("topk", num_experts=4, top_k=2, score=score)
  x = jnp.eye(4, dtype=jnp.float32)[None, :3]

  @jax.jit
  def run(kernel):
    return router.apply({"params": {"gate": {"kernel": kernel}}}, x)

  return run


_RUN = {score: _jitted_router(score) for score in ("softmax", "sigmoid")}


@hypothesis.given(
    score=st.sampled_from(["softmax", "sigmoid"]),
    kernel=st.lists(st.floats(-20.0, 20.0, allow_nan=False, width=32),
                    min_size=16, max_size=16))
def test_probs_rows_sum_to_one_and_weights_are_selected_probs(score, kernel):
  kernel = np.asarray(kernel, np.float32).reshape(4, 4)
  out = _RUN[score](jnp.asarray(kernel))
  np.testing.assert_allclose(np.sum(out.probs, axis=-1), np.ones(3), rtol=1e-5)
  assert np.all(np.asarray(out.probs) >= 0)
  experts = np.asarray(out.plan.expert).reshape(3, 2)
  # Distinct experts per token, and the K chosen are the K best scores.
  assert np.all(experts[:, 0] != experts[:, 1])
  scores = (1 / (1 + np.exp(-kernel[:3].astype(np.float64))) if score == "sigmoid"
            else np.asarray(out.probs, np.float64))
  chosen = np.take_along_axis(scores, experts, axis=1)
  for t in range(3):
    others = np.delete(scores[t], experts[t])
    assert chosen[t].min() >= others.max() - 1e-6
  assert np.all(np.asarray(out.plan.weight) >= 0)
  # Weights: softmax p (unnormalised) or sigmoid s of the chosen experts.
  np.testing.assert_allclose(np.asarray(out.plan.weight).reshape(3, 2), chosen,
                             rtol=1e-5, atol=1e-7)


def test_router_switch_loss_matches_balance():
  router = routers.create("topk", num_experts=4, top_k=2, score="sigmoid")
  out = _route(router, SIGMOID_LOGITS)
  expected = balance.switch_loss(out.probs, out.plan.expert.reshape(3, 2), 4)
  np.testing.assert_allclose(out.losses["switch"], expected, rtol=1e-6)


def test_sigmoid_probs_stay_finite_when_every_score_underflows():
  # Logits of -120 make float32 sigmoid 0 for every expert; s / sum(s) is then
  # computed as softmax(log sigmoid(z)) = uniform 1/4, and normalized weights 1/2.
  router = routers.create("topk", num_experts=4, top_k=2, score="sigmoid", normalize=True)
  out = _route(router, np.full((1, 4), -120.0))
  np.testing.assert_allclose(out.probs, np.full((1, 4), 0.25), rtol=1e-6)
  np.testing.assert_allclose(out.plan.weight, [0.5, 0.5], rtol=1e-6)
  assert np.isfinite(float(out.losses["switch"]))
