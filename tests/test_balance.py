"""Balance losses (moejax/balance.py): Switch load-balancing loss and router z-loss.

switch_loss = E * sum_e f_e P_e, f_e = share of the T*K selections on expert e
(no gradient), P_e = mean_t p_te. z_loss = mean_t (logsumexp_e z_te)^2.
"""
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import balance


def test_switch_loss_is_one_at_perfect_balance_k1():
  # T = 4, E = 4, K = 1, round robin: f = [1/4] * 4, P = [1/4] * 4,
  # L = 4 * 4 * (1/4 * 1/4) = 1.
  probs = jnp.full((4, 4), 0.25)
  expert_index = jnp.array([[0], [1], [2], [3]])
  assert float(balance.switch_loss(probs, expert_index, 4)) == 1.0


def test_switch_loss_is_one_at_perfect_balance_k2():
  # T = 6, E = 3, K = 2: every expert gets 4 of the 12 selections, f = [1/3] * 3;
  # uniform P = [1/3] * 3; L = 3 * 3 * (1/3 * 1/3) = 1.
  probs = jnp.full((6, 3), 1 / 3)
  expert_index = jnp.array([[0, 1], [2, 0], [1, 2], [0, 1], [2, 0], [1, 2]])
  np.testing.assert_allclose(balance.switch_loss(probs, expert_index, 3), 1.0, rtol=1e-6)


def test_switch_loss_is_one_for_any_probs_when_counts_are_balanced():
  # f = 1/E for every expert gives L = E * (1/E) * sum_e P_e = sum_e P_e = 1.
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (8, 4)), axis=-1)
  expert_index = jnp.array([[0], [1], [2], [3], [3], [2], [1], [0]])
  np.testing.assert_allclose(balance.switch_loss(probs, expert_index, 4), 1.0, rtol=1e-6)


def test_switch_loss_is_num_experts_under_collapse():
  # T = 5, E = 4, K = 1, every token on expert 2 with probability 1:
  # f = [0, 0, 1, 0], P = [0, 0, 1, 0], L = 4 * 1 * 1 = 4 = E.
  probs = jnp.zeros((5, 4)).at[:, 2].set(1.0)
  expert_index = jnp.full((5, 1), 2)
  assert float(balance.switch_loss(probs, expert_index, 4)) == 4.0


# T = 4, E = 2, K = 1.
#   probs = [[.9, .1], [.8, .2], [.3, .7], [.6, .4]], experts [0, 0, 1, 0]
#   f = [3/4, 1/4]
#   P = [(.9 + .8 + .3 + .6) / 4, (.1 + .2 + .7 + .4) / 4] = [.65, .35]
#   L = 2 * (.75 * .65 + .25 * .35) = 2 * (.4875 + .0875) = 1.15
MID_PROBS = jnp.array([[.9, .1], [.8, .2], [.3, .7], [.6, .4]])
MID_EXPERTS = jnp.array([[0], [0], [1], [0]])


def test_switch_loss_intermediate_case():
  np.testing.assert_allclose(balance.switch_loss(MID_PROBS, MID_EXPERTS, 2), 1.15, rtol=1e-6)


# T = 3, E = 3, K = 2 with a mask.
#   experts [[0, 1], [0, 2], [1, 0]], mask [[T, T], [T, F], [F, F]]
#   counted selections: e0 (t0), e1 (t0), e0 (t1) -> counts [2, 1, 0] over 3 slots
#   f = [2/3, 1/3, 0]
#   probs [[.5, .3, .2], [.6, .2, .2], [.2, .5, .3]] -> P = [1.3, 1.0, .7] / 3
#   L = 3 * (2/3 * 1.3/3 + 1/3 * 1.0/3) = 3 * 3.6 / 9 = 1.2
MASK_PROBS = jnp.array([[.5, .3, .2], [.6, .2, .2], [.2, .5, .3]])
MASK_EXPERTS = jnp.array([[0, 1], [0, 2], [1, 0]])
MASK = jnp.array([[True, True], [True, False], [False, False]])


def test_switch_loss_mask():
  np.testing.assert_allclose(balance.switch_loss(MASK_PROBS, MASK_EXPERTS, 3, mask=MASK),
                             1.2, rtol=1e-6)
  # Without a mask all 6 selections count: counts [3, 2, 1], f = [1/2, 1/3, 1/6],
  # L = 3 * (1/2 * 1.3/3 + 1/3 * 1.0/3 + 1/6 * .7/3) = (.65 + 1/3 + .7/6) = 1.1
  np.testing.assert_allclose(balance.switch_loss(MASK_PROBS, MASK_EXPERTS, 3), 1.1,
                             rtol=1e-6)
  full = jnp.ones((3, 2), bool)
  np.testing.assert_allclose(balance.switch_loss(MASK_PROBS, MASK_EXPERTS, 3, mask=full),
                             1.1, rtol=1e-6)
  # Nothing counted: f = 0 (no division by zero), L = 0.
  none = jnp.zeros((3, 2), bool)
  assert float(balance.switch_loss(MASK_PROBS, MASK_EXPERTS, 3, mask=none)) == 0.0


def test_switch_loss_gradient_is_e_f_over_t():
  # dL/dp_te = E * f_e / T, the same for every token (f has no gradient).
  #   intermediate case: E = 2, T = 4, f = [3/4, 1/4] -> [.375, .125] per row.
  grad = jax.grad(balance.switch_loss)(MID_PROBS, MID_EXPERTS, 2)
  np.testing.assert_allclose(grad, np.tile([[.375, .125]], (4, 1)), rtol=1e-6)
  #   masked case: E = 3, T = 3, f = [2/3, 1/3, 0] -> [2/3, 1/3, 0] per row.
  grad = jax.grad(balance.switch_loss)(MASK_PROBS, MASK_EXPERTS, 3, MASK)
  np.testing.assert_allclose(grad, np.tile([[2 / 3, 1 / 3, 0.0]], (3, 1)), rtol=1e-6)


def test_switch_loss_is_linear_in_probs():
  # With the selection fixed (argmax is invariant to scaling), L(c p) = c L(p):
  # f does not depend on p, so d/dc L(c p) at c = 1 equals L(p) = 1.15.
  def loss(c):
    p = c * MID_PROBS
    return balance.switch_loss(p, jnp.argmax(p, axis=-1)[:, None], 2)
  np.testing.assert_allclose(loss(3.0), 3 * 1.15, rtol=1e-6)
  np.testing.assert_allclose(jax.grad(loss)(1.0), 1.15, rtol=1e-6)


def test_switch_loss_checks_num_experts_and_returns_float32():
  with pytest.raises(ValueError, match="num_experts"):
    balance.switch_loss(MID_PROBS, MID_EXPERTS, 3)
  out = balance.switch_loss(MID_PROBS.astype(jnp.bfloat16), MID_EXPERTS, 2)
  assert out.dtype == jnp.float32
  # bfloat16(.9) etc. are within 2^-8 relative of the float32 values.
  np.testing.assert_allclose(out, 1.15, rtol=1e-2)


def _switch_loss_numpy(probs, expert_index, mask, num_experts):
  counts = np.zeros(num_experts)
  for t, k in zip(*np.nonzero(mask)):
    counts[expert_index[t, k]] += 1
  f = counts / max(mask.sum(), 1)
  return num_experts * np.sum(f * probs.mean(axis=0))


_SWITCH = jax.jit(balance.switch_loss, static_argnums=2)


@hypothesis.given(
    logits=st.lists(st.floats(-5, 5, width=32), min_size=24, max_size=24),
    experts=st.lists(st.integers(0, 3), min_size=12, max_size=12),
    mask=st.lists(st.booleans(), min_size=12, max_size=12))
def test_switch_loss_matches_numpy(logits, experts, mask):
  # Fixed shapes: T = 6, E = 4, K = 2.
  logits = np.asarray(logits, np.float64).reshape(6, 4)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  experts = np.asarray(experts).reshape(6, 2)
  mask = np.asarray(mask).reshape(6, 2)
  got = _SWITCH(jnp.asarray(probs, jnp.float32), jnp.asarray(experts), 4, jnp.asarray(mask))
  np.testing.assert_allclose(got, _switch_loss_numpy(probs, experts, mask, 4),
                             rtol=1e-5, atol=1e-6)
  # Bounds: 0 <= L <= E (f and P are distributions).
  assert -1e-6 <= float(got) <= 4 + 1e-5


def test_z_loss_by_hand():
  # logsumexp([0, 0]) = log 2; logsumexp([log 3, 0]) = log(3 + 1) = 2 log 2.
  # z = ((log 2)^2 + (2 log 2)^2) / 2 = 2.5 (log 2)^2 = 1.2011325
  logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])
  expected = 2.5 * math.log(2) ** 2
  np.testing.assert_allclose(expected, 1.2011325, rtol=1e-6)
  np.testing.assert_allclose(balance.z_loss(logits), expected, rtol=1e-6)


def test_z_loss_three_experts_and_large_logits():
  # Row 0: logsumexp([1, 2, 3]) = 3 + log(1 + e^-1 + e^-2).
  # Row 1: logsumexp([100, 100, 100]) = 100 + log 3 (exp(100) overflows float32,
  #        so this checks the max-shift).
  # Row 2: logsumexp([-1, -1, -1]) = -1 + log 3.
  logits = jnp.array([[1.0, 2.0, 3.0], [100.0, 100.0, 100.0], [-1.0, -1.0, -1.0]])
  lse = np.array([3 + np.log1p(np.exp(-1) + np.exp(-2)), 100 + np.log(3), -1 + np.log(3)])
  np.testing.assert_allclose(balance.z_loss(logits), np.mean(lse ** 2), rtol=1e-6)
  assert balance.z_loss(logits.astype(jnp.bfloat16)).dtype == jnp.float32


def test_z_loss_gradient():
  # d/dz_te mean_t lse_t^2 = 2 lse_t softmax(z_t)_e / T.
  #   row [0, 0]: lse = log 2, softmax = [1/2, 1/2] -> 2 log2 * 1/2 / 2 = log2 / 2 each
  #   row [log 3, 0]: lse = 2 log 2, softmax = [3/4, 1/4]
  #                   -> 2 * 2 log2 * [3/4, 1/4] / 2 = log2 * [3/2, 1/2]
  logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])
  ln2 = math.log(2)
  np.testing.assert_allclose(jax.grad(balance.z_loss)(logits),
                             [[ln2 / 2, ln2 / 2], [1.5 * ln2, 0.5 * ln2]], rtol=1e-6)


# ----------------------------------------------------------------------------
# Scopes: sequence, microbatch, global (balance.scoped_switch_loss).
#
# B = 2 sequences of L = 2 tokens, E = 2, K = 1:
#   seq 0: probs [[.9, .1], [.7, .3]], experts [0, 0]: f = [1, 0],  P = [.8, .2]
#          L_0 = 2 * (1 * .8) = 1.6
#   seq 1: probs [[.2, .8], [.6, .4]], experts [1, 0]: f = [.5, .5], P = [.4, .6]
#          L_1 = 2 * (.5 * .4 + .5 * .6) = 1.0
#   sequence scope: (1.6 + 1.0) / 2 = 1.3
#   microbatch scope, one shard: experts [0, 0, 1, 0] -> f = [.75, .25],
#          P = [(.9 + .7 + .2 + .6) / 4, (.1 + .3 + .8 + .4) / 4] = [.6, .4]
#          L = 2 * (.75 * .6 + .25 * .4) = 1.1
#   microbatch scope, two shards of one sequence each: as the sequence scope, 1.3
#   global scope with step counts [1, 3]: f = [.25, .75], P local = [.6, .4]
#          L = 2 * (.25 * .6 + .75 * .4) = 0.9
SEQ_PROBS = jnp.array([[[.9, .1], [.7, .3]], [[.2, .8], [.6, .4]]])
SEQ_EXPERTS = jnp.array([[[0], [0]], [[1], [0]]])


@pytest.mark.parametrize("scope,kwargs,expected", [
    ("sequence", {}, 1.3),
    ("microbatch", {}, 1.1),
    ("microbatch", {"groups": 2}, 1.3),
    ("global", {}, 1.1),
    ("global", {"global_counts": jnp.array([1.0, 3.0])}, 0.9),
])
def test_scoped_switch_loss_by_hand(scope, kwargs, expected):
  got = balance.scoped_switch_loss(SEQ_PROBS, SEQ_EXPERTS, 2, scope=scope, **kwargs)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("scope", balance.SCOPES)
def test_every_scope_is_one_when_balanced_and_e_when_collapsed(scope):
  # Balanced: every sequence puts one token on each of E = 4 experts with uniform
  # probabilities: f = P = 1/4 at every scope, L = 4 * 4 * 1/16 = 1.
  experts = jnp.array([[[0], [1], [2], [3]], [[3], [2], [1], [0]]])
  uniform = jnp.full((2, 4, 4), 0.25)
  np.testing.assert_allclose(balance.scoped_switch_loss(uniform, experts, 4, scope=scope),
                             1.0, rtol=1e-6)
  # Collapsed: every token on expert 1 with probability 1: f = P = e_1, L = E = 4.
  collapsed = jnp.zeros((2, 4, 4)).at[..., 1].set(1.0)
  np.testing.assert_allclose(
      balance.scoped_switch_loss(collapsed, jnp.ones((2, 4, 1), int), 4, scope=scope),
      4.0, rtol=1e-6)


def test_sequence_scope_penalises_specialised_sequences_that_global_scope_allows():
  # Two sequences, each entirely on its own expert with probability 1 (E = 2):
  #   sequence scope: each sequence f = P = one-hot, L = 2 * 1 = 2 (as collapse)
  #   global scope: f = [.5, .5], P = [.5, .5], L = 2 * (.25 + .25) = 1 (balanced)
  probs = jnp.array([[[1.0, 0.0]] * 3, [[0.0, 1.0]] * 3])
  experts = jnp.array([[[0]] * 3, [[1]] * 3])
  np.testing.assert_allclose(
      balance.scoped_switch_loss(probs, experts, 2, scope="sequence"), 2.0, rtol=1e-6)
  np.testing.assert_allclose(
      balance.scoped_switch_loss(probs, experts, 2, scope="global"), 1.0, rtol=1e-6)


def test_scoped_switch_loss_gradient_uses_the_scope_counts():
  # d/dp_te of the global-scope loss with counts c: E * f_e / T with f = c / sum c,
  # the same for every token. Counts [1, 3], E = 2, T = 4: [2 * .25 / 4, 2 * .75 / 4].
  grad = jax.grad(lambda p: balance.scoped_switch_loss(
      p, SEQ_EXPERTS, 2, scope="global", global_counts=jnp.array([1.0, 3.0])))(SEQ_PROBS)
  np.testing.assert_allclose(grad, np.broadcast_to([0.125, 0.375], (2, 2, 2)), rtol=1e-6)
  # Sequence scope: each sequence's own f, divided by its L = 2 and by B = 2:
  #   seq 0 f = [1, 0] -> 2 * [1, 0] / 2 / 2 = [.5, 0]; seq 1 f = [.5, .5] -> [.25, .25]
  grad = jax.grad(lambda p: balance.scoped_switch_loss(
      p, SEQ_EXPERTS, 2, scope="sequence"))(SEQ_PROBS)
  np.testing.assert_allclose(grad, [[[.5, 0], [.5, 0]], [[.25, .25], [.25, .25]]], rtol=1e-6)


def test_scoped_switch_loss_rejects_bad_scope_and_shards():
  with pytest.raises(ValueError, match="balance_scope"):
    balance.scoped_switch_loss(SEQ_PROBS, SEQ_EXPERTS, 2, scope="batch")
  with pytest.raises(ValueError, match="3 data shards"):
    balance.scoped_switch_loss(SEQ_PROBS, SEQ_EXPERTS, 2, scope="microbatch", groups=3)


def test_selection_counts_are_float32_whatever_the_input():
  # experts [[0, 2], [2, 2]] over E = 3 -> counts [1, 0, 3], exact in float32.
  counts = balance.selection_counts(jnp.array([[0, 2], [2, 2]], jnp.int16), 3)
  assert counts.dtype == jnp.float32
  np.testing.assert_array_equal(counts, [1, 0, 3])
  # 2^24 + 1 is not a float32, so a step's counts must stay below 2^24 per
  # expert; bfloat16 would already round 257 to 256.
  assert float(jnp.asarray(257, jnp.bfloat16)) == 256.0


# ----------------------------------------------------------------------------
# Tsallis entropy S_q(p) = (1 - sum_e p_e^q) / (q - 1) (DynMoLE 2025).

@pytest.mark.parametrize("probs,q,expected", [
    ([.25] * 4, 2.0, 0.75),             # 1 - 4 / 16
    ([.25] * 4, 0.5, 2.0),              # (1 - 4 * .5) / (.5 - 1)
    ([.25] * 4, 1.0, math.log(4)),      # Shannon
    ([.5, .5, 0, 0], 2.0, 0.5),         # 1 - 2 * .25
    ([.5, .5, 0, 0], 3.0, 0.375),       # (1 - 2 * .125) / 2
    ([0, 1, 0, 0], 2.0, 0.0),           # collapsed: no uncertainty
    ([0, 1, 0, 0], 0.5, 0.0),
    ([0, 1, 0, 0], 1.0, 0.0),
])
def test_tsallis_entropy_by_hand(probs, q, expected):
  np.testing.assert_allclose(balance.tsallis_entropy(jnp.array(probs), q), expected,
                             rtol=1e-6, atol=1e-7)


def test_tsallis_loss_is_the_token_mean_and_has_finite_gradients():
  # Rows: uniform (S_2 = .75) and collapsed (0): mean .375.
  probs = jnp.array([[.25] * 4, [1.0, 0, 0, 0]])
  np.testing.assert_allclose(balance.tsallis_loss(probs, 2.0), 0.375, rtol=1e-6)
  # dS_2/dp = -2p, averaged over T = 2 rows: -p.
  np.testing.assert_allclose(jax.grad(balance.tsallis_loss)(probs, 2.0), -probs, rtol=1e-6)
  # q < 1 has p^(q-1) -> inf at p = 0: zero entries must not give NaN.
  assert np.all(np.isfinite(jax.grad(balance.tsallis_loss)(probs, 0.5)))


# ----------------------------------------------------------------------------
# Aux-loss-free bias update (DeepSeek 2024).
#   counts [4, 2, 1, 1], mean 2:
#   sign:          b += .1 * sign(2 - c) = .1 * [-1, 0, 1, 1]       = [-.1, 0, .1, .1]
#   proportional:  b += .1 * (2 - c) / 2 = .1 * [-1, 0, .5, .5]     = [-.1, 0, .05, .05]
#   re-centred sign: minus the mean .025                            = [-.125, -.025, .075, .075]

@pytest.mark.parametrize("mode,recenter,expected", [
    ("sign", False, [-.1, 0, .1, .1]),
    ("proportional", False, [-.1, 0, .05, .05]),
    ("sign", True, [-.125, -.025, .075, .075]),
])
def test_bias_update_by_hand(mode, recenter, expected):
  got = balance.bias_update(jnp.zeros(4), jnp.array([4, 2, 1, 1], jnp.int32), 0.1, mode,
                            recenter)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_bias_update_leaves_balanced_counts_alone_and_checks_mode():
  bias = jnp.array([.3, -.1, 0.0])
  for mode in balance.BIAS_UPDATES:
    np.testing.assert_array_equal(balance.bias_update(bias, jnp.full(3, 7.0), 0.5, mode), bias)
  with pytest.raises(ValueError, match="bias_update"):
    balance.bias_update(bias, jnp.ones(3), 0.1, "momentum")


# ----------------------------------------------------------------------------
# Expert-router coupling loss on M [E, E] (rows: experts, columns: proxies).
#   M = [[2, 0], [1, 3]], form `ce`:
#   rows:    row 0 [2, 0] target 0: log(1 + e^-2) = .126928
#            row 1 [1, 3] target 1: log(1 + e^-2) = .126928
#   columns: col 0 [2, 1] target 0: log(1 + e^-1) = .313262
#            col 1 [0, 3] target 1: log(1 + e^-3) = .048587
#   L = (.126928 + (.313262 + .048587) / 2) / 2 = .153926

def test_erc_ce_loss_by_hand():
  norms = jnp.array([[2.0, 0.0], [1.0, 3.0]])
  expected = 0.5 * (math.log1p(math.exp(-2))
                    + 0.5 * (math.log1p(math.exp(-1)) + math.log1p(math.exp(-3))))
  np.testing.assert_allclose(expected, 0.153926, rtol=1e-5)
  np.testing.assert_allclose(balance.erc_loss(norms, "ce"), expected, rtol=1e-6)


def test_erc_margin_loss_by_hand():
  # M = [[2, 0], [1.5, 3]], margin .5; the 2 * E * (E - 1) = 4 hinge terms:
  #   expert 0 on proxy 1: relu(0 - .5 * 2) = 0      proxy 1 on expert 0: relu(0 - .5 * 3) = 0
  #   expert 1 on proxy 0: relu(1.5 - .5 * 3) = 0    proxy 0 on expert 1: relu(1.5 - .5 * 2) = .5
  #   L = .5 / 4 = .125
  norms = jnp.array([[2.0, 0.0], [1.5, 3.0]])
  np.testing.assert_allclose(balance.erc_loss(norms, "margin", 0.5), 0.125, rtol=1e-6)
  # A margin of 1 with a strictly diagonal M: every hinge is 0.
  assert float(balance.erc_loss(jnp.array([[2.0, 1.0], [1.0, 3.0]]), "margin", 1.0)) == 0.0


def test_erc_loss_falls_as_m_becomes_diagonal_and_checks_form():
  base = jnp.ones((4, 4))
  diagonal = base + 5 * jnp.eye(4)
  for form in balance.ERC_FORMS:
    assert float(balance.erc_loss(diagonal, form)) < float(balance.erc_loss(base, form))
  # Uniform M: every row and column softmax is uniform, CE = log E.
  np.testing.assert_allclose(balance.erc_loss(base, "ce"), math.log(4), rtol=1e-6)
  with pytest.raises(ValueError, match="erc_form"):
    balance.erc_loss(base, "hinge")


@pytest.mark.parametrize("norms,share,ratio", [
    # rows 0, 1 and columns 0, 1 all peak on the diagonal; (2 + 3) / 2 over (1 + 1.5) / 2.
    ([[2.0, 1.0], [1.5, 3.0]], 1.0, 2.0),
    # row 0 peaks off the diagonal, column 0 ties (1 = 1, not strict): 2 of 4 hold;
    # mean diagonal (1 + 3) / 2 = 2 over mean off-diagonal (2 + 1) / 2 = 1.5.
    ([[1.0, 2.0], [1.0, 3.0]], 0.5, 4 / 3),
])
def test_diagonal_dominance_by_hand(norms, share, ratio):
  got = balance.diagonal_dominance(jnp.array(norms))
  np.testing.assert_allclose(got["erc_diagonal_share"], share, rtol=1e-6)
  np.testing.assert_allclose(got["erc_diagonal_ratio"], ratio, rtol=1e-6)
