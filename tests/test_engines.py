"""Every engine and backend equals the loop oracle, forward and backward.

Plans are fuzzed (hypothesis draws the seed, how many experts are in use, and the
share of invalid slots), so groups are uneven and often empty; with dropping, the
capacity step cuts each expert to C before the engines run.
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
from moejax import capacity, dispatch
from tests.helpers import assert_trees_close, random_ffn, random_plan

NUM_TOKENS, MODEL_DIM, HIDDEN_DIM = 12, 8, 6

ENGINES = {
    "einsum": dispatch.create("einsum"),
    "sorted-xla": dispatch.create("sorted", backend="xla", block_size=4),
    "sorted-xla-128": dispatch.create("sorted", backend="xla", block_size=128),
    "sorted-ragged_dot": dispatch.create("sorted", backend="ragged_dot"),
    # Interpret mode on CPU; 8-row tiles put group boundaries inside tiles.
    "sorted-pallas": dispatch.create("sorted", backend="pallas",
                                     kernel_settings=pallas_kernels.KernelSettings(
                                         tiling=pallas_kernels.GmmTiling.uniform(8, 8, 8),
                                         combine_tiles=pallas_kernels.CombineTiles(8, 8, 8))),
}
ORACLE = dispatch.create("loop")

# (K, E) as in the spec; K = 8 needs E >= 8, so it runs with E = 64 only.
SHAPES = [(1, 4), (2, 4), (1, 64), (2, 64), (8, 64)]


def _loss_fn(engine, capacity_per_expert):
  """Scalar of y whose gradient reaches x, the expert weights and the plan weights."""
  def loss(x, weights, plan_weight, plan, ffn):
    y = engine(x, plan.replace(weight=plan_weight), ffn.replace(weights=weights),
               capacity=capacity_per_expert)
    return jnp.sum(jnp.sin(y) * jnp.arange(1, y.shape[1] + 1)), y
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@functools.lru_cache(maxsize=None)
def _compiled(engine_name, capacity_per_expert):
  engine = ORACLE if engine_name == "loop" else ENGINES[engine_name]
  return _loss_fn(engine, capacity_per_expert)


# A block larger than every group (sorted-xla-128) once per K, on the largest E.
CASES = [(engine, k, e, drop) for engine in ENGINES for k, e in SHAPES for drop in (False, True)
         if engine != "sorted-xla-128" or e == 64]


@pytest.mark.parametrize("engine_name,top_k,num_experts,drop", CASES,
                         ids=[f"{n}-{k}-{e}-{'capacity' if d else 'dropless'}"
                              for n, k, e, d in CASES])
@hypothesis.given(seed=st.integers(0, 2**31 - 1), active=st.integers(1, 64),
                  invalid_share=st.sampled_from([0.0, 0.3]))
def test_engine_matches_loop(engine_name, top_k, num_experts, drop, seed, active,
                             invalid_share):
  rng = np.random.default_rng(seed)
  plan = random_plan(rng, NUM_TOKENS, top_k, num_experts, min(active, num_experts),
                     invalid_share)
  # One FFN kind per case keeps one compilation per case: SwiGLU when dropless,
  # a gelu MLP with dropping.
  ffn = random_ffn(rng, num_experts, MODEL_DIM, HIDDEN_DIM, glu=not drop,
                   activation="gelu" if drop else "silu")
  x = jnp.asarray(rng.normal(size=(NUM_TOKENS, MODEL_DIM)), jnp.float32)
  cap = None
  if drop:
    cap = capacity.capacity(NUM_TOKENS, top_k, num_experts, capacity_factor=0.5)
    probs = jnp.asarray(rng.dirichlet(np.ones(num_experts), NUM_TOKENS), jnp.float32)
    plan, stats = capacity.apply_capacity(plan, probs, num_experts, cap, "position")
    counts = np.bincount(np.asarray(plan.expert)[np.asarray(plan.valid)],
                         minlength=num_experts)
    assert counts.max() <= cap

  args = (x, ffn.weights, plan.weight, plan, ffn)
  (want_loss, want_y), want_grads = _compiled("loop", cap)(*args)
  (got_loss, got_y), got_grads = _compiled(engine_name, cap)(*args)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, atol=1e-5)
  # Gradients sum products in another order than the oracle (e.g. d weight =
  # <g W_o^T, h> against <g, h W_o>), hence the looser float32 tolerance.
  assert_trees_close(got_grads, want_grads, rtol=1e-4, atol=1e-4,
                     what=f"{engine_name} gradients")
  # Slots that are not valid contribute nothing and get no weight gradient.
  assert np.all(np.asarray(got_grads[2])[~np.asarray(plan.valid)] == 0)


def test_oracle_by_hand():
  """loop on a 2-token, 2-expert plan with identity-like experts, computed by hand.

  Experts are relu MLPs with W_i = I and W_o = s_e I (s = 2, 3), so
  f_e(x) = s_e relu(x). Token 0 -> e0 (w .5) and e1 (w .25); token 1 -> e1 (w 1).
  x0 = [1, -1] gives y0 = .5*2*[1, 0] + .25*3*[1, 0] = [1.75, 0];
  x1 = [2, 3] gives y1 = 1*3*[2, 3] = [6, 9].
  """
  from moejax.core import RoutingPlan
  from moejax.experts import ExpertFFN
  eye = jnp.eye(2)
  ffn = ExpertFFN(weights={"wi": jnp.stack([eye, eye]), "wo": jnp.stack([2 * eye, 3 * eye])},
                  activation="relu", glu=False)
  plan = RoutingPlan(token=jnp.array([0, 0, 1, 1]), expert=jnp.array([0, 1, 1, 0]),
                     weight=jnp.array([0.5, 0.25, 1.0, 0.0]),
                     valid=jnp.array([True, True, True, False]))
  x = jnp.array([[1.0, -1.0], [2.0, 3.0]])
  want = np.array([[1.75, 0.0], [6.0, 9.0]])
  for engine in [ORACLE, *ENGINES.values()]:
    np.testing.assert_allclose(engine(x, plan, ffn), want, rtol=1e-6, err_msg=str(engine))


def test_bfloat16_engines_match_loop():
  """In bfloat16 every engine stays within bf16 rounding of the float32 oracle."""
  rng = np.random.default_rng(0)
  plan = random_plan(rng, 32, 2, 8, 8)
  ffn32 = random_ffn(rng, 8, 16, 12, glu=True)
  x32 = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
  want = ORACLE(x32, plan, ffn32)
  ffn16 = ffn32.replace(weights=jax.tree_util.tree_map(
      lambda w: w.astype(jnp.bfloat16), ffn32.weights))
  for name, engine in ENGINES.items():
    got = engine(x32.astype(jnp.bfloat16), plan, ffn16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=5e-2, atol=5e-2,
                               err_msg=name)
