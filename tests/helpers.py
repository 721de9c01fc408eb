"""Shared test helpers: random plans, expert FFNs and tree comparisons."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax.core import RoutingPlan
from moejax.experts import ExpertFFN


def random_plan(rng: np.random.Generator, num_tokens: int, top_k: int, num_experts: int,
                active_experts: int, invalid_share: float = 0.0) -> RoutingPlan:
  """A tokens-choose plan whose experts come from `active_experts` of E, Zipf-skewed.

  Each token gets top_k distinct experts, so groups are uneven and, when
  active_experts < E, some are empty.
  """
  active = rng.permutation(num_experts)[:max(active_experts, top_k)]
  popularity = 1.0 / np.arange(1, len(active) + 1)
  popularity /= popularity.sum()
  expert = np.stack([rng.choice(active, size=top_k, replace=False, p=popularity)
                     for _ in range(num_tokens)])
  weight = rng.uniform(0.05, 1.0, size=(num_tokens, top_k)).astype(np.float32)
  valid = rng.uniform(size=(num_tokens, top_k)) >= invalid_share
  return RoutingPlan.from_topk(jnp.asarray(expert, jnp.int32), jnp.asarray(weight),
                               jnp.asarray(valid))


def random_ffn(rng: np.random.Generator, num_experts: int, model_dim: int, hidden_dim: int,
               glu: bool, activation: str = "silu", dtype=jnp.float32) -> ExpertFFN:
  names = ("wi_gate", "wi_up") if glu else ("wi",)
  weights = {n: rng.normal(size=(num_experts, model_dim, hidden_dim)) / np.sqrt(model_dim)
             for n in names}
  weights["wo"] = rng.normal(size=(num_experts, hidden_dim, model_dim)) / np.sqrt(hidden_dim)
  weights = {k: jnp.asarray(v, dtype) for k, v in weights.items()}
  return ExpertFFN(weights=weights, activation=activation, glu=glu)


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-5, what=""):
  """Every leaf of `actual` equals the matching leaf of `expected` within tolerance."""
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
  flat_e, tree_e = jax.tree_util.tree_flatten(expected)
  assert len(flat_a) == len(flat_e), f"{what}: trees differ: {tree_a} vs {tree_e}"
  for (path, a), e in zip(flat_a, flat_e):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32),
                               rtol=rtol, atol=atol,
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")
