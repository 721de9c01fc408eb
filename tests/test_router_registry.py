"""Every registered router, through the contract: engine parity with `loop`
(values and gradients), causality, refusal of causal use where it would leak,
and the intervention bias on its logits.

Parametrised over routers.names(), so a router is covered the day it is registered.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import MoE, routers
from moejax.core import RoutingContext
from moejax.models import TransformerLM
from tests.helpers import assert_trees_close, jit_init

B, L, D, E, K, F = 2, 8, 12, 4, 2, 8
ENGINES = [("einsum", "xla"), ("sorted", "xla"), ("sorted", "ragged_dot")]
RNGS = {"router": jax.random.key(7)}


def _inputs(seed=0):
  """x and a context with every field a router may read: token ids, a causal
  head-averaged attention (attention_aware), a step and 2 own experts of the 4
  (rexmoe's progressive scaling masks the other 2 at step 3)."""
  x = jax.random.normal(jax.random.key(seed), (B, L, D))
  token_ids = jax.random.randint(jax.random.key(seed + 1), (B, L), 0, 6)
  scores = jax.random.normal(jax.random.key(seed + 2), (B, L, L))
  attention = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((L, L), bool)), scores, -jnp.inf))
  return x, RoutingContext(token_ids=token_ids, layer=0, attention=attention,
                           step=jnp.asarray(3), own_experts=E // 2)


def _layer(name, engine="loop", backend="xla", **router_kwargs):
  return MoE(num_experts=E, top_k=K, hidden_dim=F, router=name, engine=engine,
             backend=backend, block_size=4, router_kwargs=router_kwargs)


@functools.lru_cache(maxsize=None)
def _variables(name):
  x, ctx = _inputs()
  return jit_init(_layer(name), {"params": jax.random.key(1), "router": jax.random.key(2)}, x,
                  ctx, deterministic=False)


def _value_and_grads(layer, variables, x, ctx, deterministic):
  def loss(params, x):
    (y, aux), _ = layer.apply({**variables, "params": params}, x, ctx,
                              deterministic=deterministic, rngs=RNGS, mutable=["routing"])
    return jnp.sum(jnp.tanh(y) * jnp.arange(D)) + aux.loss, (y, aux)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      variables["params"], x)


# Routers whose evaluation routing differs from their training routing.
EVAL_DIFFERS = ("random", "selective_sinkhorn", "sinkhorn")
MODES = [(n, False) for n in routers.names()] + [(n, True) for n in EVAL_DIFFERS]
# An engine sees only the plan (token, expert, weight, valid per slot), so every
# engine and backend runs one router of each kind of plan: K valid slots per token
# (topk), a varying count with invalid slots (top_p, null_experts, relu), expert-
# major slots (expert_choice) and rows that mix tokens (soft). Every other router,
# and every router at evaluation, runs the default engine (sorted, xla).
EVERY_ENGINE = ("topk", "top_p", "null_experts", "relu", "expert_choice", "soft")


@pytest.mark.parametrize("name,deterministic", MODES,
                         ids=[f"{n}-{'eval' if d else 'train'}" for n, d in MODES])
def test_every_router_matches_loop_on_the_engines(name, deterministic):
  """y, the total loss and the gradients for x and every parameter equal the
  loop oracle's, on every engine and backend for one router per kind of plan, on
  the default engine for the others (EVERY_ENGINE)."""
  x, ctx = _inputs()
  variables = _variables(name)
  (want_loss, (want_y, _)), want_grads = _value_and_grads(_layer(name), variables, x, ctx,
                                                           deterministic)
  assert float(jnp.max(jnp.abs(want_y))) > 0, "the oracle's output is all zero"
  every = name in EVERY_ENGINE and not deterministic
  for engine, backend in (ENGINES if every else ENGINES[1:2]):
    layer = _layer(name, engine, backend)
    (got_loss, (got_y, _)), got_grads = _value_and_grads(layer, variables, x, ctx,
                                                         deterministic)
    what = f"{name} {engine}/{backend}"
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5, err_msg=what)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, atol=1e-5, err_msg=what)
    assert_trees_close(got_grads, want_grads, rtol=1e-4, atol=1e-5, what=what)


def _router(name, **kwargs):
  return routers.create(name, num_experts=E, top_k=K, **kwargs)


CAUSAL = [n for n in routers.names() if _router(n).is_causal]
NONCAUSAL = [n for n in routers.names() if n not in CAUSAL]


def test_the_registry_has_both_kinds():
  assert set(NONCAUSAL) == {"expert_choice", "sinkhorn", "selective_sinkhorn", "soft"}
  assert len(CAUSAL) >= 6


@functools.lru_cache(maxsize=None)
def _causal_run(case):
  """(variables, jitted apply(x, token_ids, deterministic)) of a causal layer."""
  name, _, variant = case.partition("-")
  layer = _layer(name, engine="sorted", **({"fraction": 0.0} if variant else {}))
  x, ctx = _inputs()
  ctx = ctx.replace(causal=True)
  variables = layer.init({"params": jax.random.key(3), "router": jax.random.key(2)}, x, ctx,
                         deterministic=False)

  @functools.partial(jax.jit, static_argnums=2)
  def run(x, token_ids, deterministic):
    (y, aux), _ = layer.apply(variables, x, ctx.replace(token_ids=token_ids),
                              deterministic=deterministic, rngs=RNGS, mutable=["routing"])
    return y, aux.plan
  return run


@pytest.mark.parametrize("case", CAUSAL + ["sinkhorn-fraction-0"])
@hypothesis.given(seed=st.integers(0, 2**16), cut=st.integers(0, L - 2))
def test_causal_routers_ignore_later_tokens(case, seed, cut):
  """Perturbing x (and token ids) after position `cut` leaves the layer's output and
  routing of every token up to `cut` unchanged, in training and evaluation."""
  run = _causal_run(case)
  x = jax.random.normal(jax.random.key(seed), (B, L, D))
  ids = jax.random.randint(jax.random.key(seed + 1), (B, L), 0, 6)
  later = jnp.arange(L) > cut
  x2 = jnp.where(later[None, :, None], x + jax.random.normal(jax.random.key(seed + 2), x.shape),
                 x)
  ids2 = jnp.where(later[None, :], (ids + 3) % 6, ids)
  for deterministic in (False, True):
    y1, plan1 = run(x, ids, deterministic)
    y2, plan2 = run(x2, ids2, deterministic)
    np.testing.assert_allclose(y1[:, :cut + 1], y2[:, :cut + 1], rtol=1e-5, atol=1e-6)
    early = (plan1.token % L) <= cut
    for field in ("token", "expert", "valid", "weight"):
      a, b = getattr(plan1, field), getattr(plan2, field)
      np.testing.assert_allclose(np.where(early, a, 0), np.where(early, b, 0), atol=1e-6,
                                 err_msg=f"{case} plan.{field}")
    # The perturbation reached the later tokens.
    assert float(jnp.max(jnp.abs(y1[:, cut + 1:] - y2[:, cut + 1:]))) > 0


@pytest.mark.parametrize("name", NONCAUSAL)
def test_noncausal_routers_raise_in_causal_mode(name):
  x, ctx = _inputs()
  layer = _layer(name)
  variables = _variables(name)
  with pytest.raises(ValueError, match="allow_noncausal is False.*not causal"):
    layer.apply(variables, x, ctx.replace(causal=True), deterministic=True)
  # ... unless told, and then it runs.
  allowed = _layer(name, allow_noncausal=True)
  y, _ = allowed.apply(variables, x, ctx.replace(causal=True), deterministic=True)
  assert y.shape == x.shape
  with pytest.raises(ValueError, match="allow_noncausal"):
    TransformerLM(vocab_size=16, moe=dict(num_experts=E, hidden_dim=F, router=name))
  TransformerLM(vocab_size=16, moe=dict(num_experts=E, hidden_dim=F, router=name,
                                        router_kwargs={"allow_noncausal": True}))


@pytest.mark.parametrize("name", routers.names())
def test_every_router_documents_its_paper_and_declares_its_losses(name):
  cls = routers.get(name)
  module = __import__(cls.__module__, fromlist=["_"])
  assert module.__doc__ and any(str(year) in module.__doc__ for year in range(2017, 2026))
  assert set(cls.default_loss_weights) <= set(cls.loss_names)
  assert {"num_experts", "top_k"} <= set(routers.fields(name))


@pytest.mark.parametrize("name", routers.names())
def test_every_router_annotates_its_parameters(name):
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      _variables(name).get("params", {}), is_leaf=lambda v: isinstance(v, nn.Partitioned))[0]:
    assert isinstance(leaf, nn.Partitioned) or leaf.ndim <= 1, jax.tree_util.keystr(path)


# One router per place the bias enters: top-k's hook (and so every router built on
# it: recurrent, similarity, attention_aware), with rexmoe's candidate mask after
# it and null_experts' inner top-k; top_p, relu, expert_choice and sinkhorn (and
# selective_sinkhorn) on z; soft's slots; hash (and random) without logits.
BIAS_PATHS = ("topk", "rexmoe", "null_experts", "top_p", "relu", "expert_choice", "sinkhorn",
              "soft", "hash")


@pytest.mark.parametrize("name", routers.names())
def test_every_router_with_logits_takes_the_logit_bias(name):
  """Applied with the `logit_bias` collection mutable, a router that declares
  takes_logit_bias creates one delta = 0 [E'], and a router without logits none.
  For one router per path into the logits (BIAS_PATHS): its output (plan, logits,
  probs) is bit-identical to the plain router's, and a per-sequence delta [B, E']
  moves each sequence's logits by exactly its row (logits the router masks stay
  masked). The layer and its engines see only the RouterOutput (the engine parity
  test above)."""
  x, ctx = _inputs()
  router = _layer(name).router_spec
  variables = {c: v["router"] for c, v in _variables(name).items() if "router" in v}
  out, state = router.apply(variables, x, ctx, True, mutable=["logit_bias"])
  if not routers.get(name).takes_logit_bias:
    assert "logit_bias" not in state
    return
  (zero,) = jax.tree_util.tree_leaves(state["logit_bias"])
  np.testing.assert_array_equal(zero, np.zeros(zero.shape))
  if name not in BIAS_PATHS:
    return
  plain = router.apply(variables, x, ctx, True)
  assert_trees_close(out, plain, rtol=0, atol=0, what=name)
  width = zero.shape[0]
  delta = jax.random.normal(jax.random.key(5), (B, width))
  biased = jax.tree_util.tree_map(lambda _: delta, state["logit_bias"])
  want = plain.logits.reshape(B, L, width)
  got = router.apply({**variables, "logit_bias": biased}, x, ctx, True).logits.reshape(
      B, L, width)
  masked = want <= -1e29
  np.testing.assert_allclose(np.where(masked, 0.0, got),
                             np.where(masked, 0.0, want + delta[:, None, :]),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[masked], want[masked])
