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
