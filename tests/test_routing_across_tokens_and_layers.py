"""Routers that remember and look around: the recurrent router (RMoE), similarity-
and attention-aware routing, Chain-of-Experts and ReXMoE's shared pools, each
against its equation computed by hand, in the LM, under expert parallelism, and
with its start-up errors. The registry tests (test_router_registry.py) also run
each of these routers on every engine against the loop oracle and fuzz their
causality inside one layer; here causality is fuzzed through the whole model."""
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
from moejax.parallel import ExpertParallel, make_mesh
from moejax.routers.rexmoe import psr_candidates
from tests.helpers import assert_trees_close, jit_init

B, L, D, E, K, F = 2, 6, 8, 4, 2, 8


def _sigmoid(v):
  return 1 / (1 + np.exp(-v))


def _softmax(v, axis=-1):
  v = v - v.max(axis=axis, keepdims=True)
  return np.exp(v) / np.exp(v).sum(axis=axis, keepdims=True)


def _unbox(tree):
  return jax.tree_util.tree_map(np.asarray, nn.meta.unbox(tree))


def _numpy_gru(p, x, h):
  """PyTorch-style GRU of flax's parameter names (one input bias per gate)."""
  def dense(name, v, bias=True):
    out = v @ p[name]["kernel"]
    return out + p[name]["bias"] if bias and "bias" in p[name] else out
  r = _sigmoid(dense("ir", x) + dense("hr", h, False))
  z = _sigmoid(dense("iz", x) + dense("hz", h, False))
  n = np.tanh(dense("in", x) + r * dense("hn", h))
  return (1 - z) * n + z * h


# ---------------------------------------------------------------- recurrent


def test_recurrent_router_is_a_gru_over_its_carry():
  """Logits = (GRU(x W_in, h_prev)) W_g, and the carry holds the new state."""
  router = routers.create("recurrent", num_experts=E, top_k=K, hidden=5, shared=False)
  x = np.asarray(jax.random.normal(jax.random.key(0), (B * L, D)))
  h_prev = np.asarray(jax.random.normal(jax.random.key(1), (B * L, 5)))
  carry = routers.RecurrentCarry(state=jnp.asarray(h_prev), num_experts=E, hidden=5,
                                 shared=False)
  ctx = RoutingContext(carry=carry)
  variables = jit_init(router, jax.random.key(2), x, ctx)
  out = router.apply(variables, x, ctx)
  p = _unbox(variables["params"])
  h = _numpy_gru(p["gru"], x @ p["project"]["kernel"], h_prev)
  np.testing.assert_allclose(out.carry.state, h, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.logits, h @ p["gate"]["kernel"], rtol=1e-5, atol=1e-6)
  top = np.argsort(-_softmax(h @ p["gate"]["kernel"]), axis=-1)[:, :K]
  np.testing.assert_array_equal(np.sort(np.asarray(out.plan.expert).reshape(-1, K)),
                                np.sort(top))


def _model(router="topk", num_layers=4, moe_every=2, expert_reuse=1, **moe):
  return TransformerLM(vocab_size=16, num_layers=num_layers, model_dim=D, num_heads=2,
                       mlp_dim=16, moe_every=moe_every, expert_reuse=expert_reuse,
                       moe=dict(num_experts=E, top_k=K, hidden_dim=F, router=router, **moe))


TOKENS = jax.random.randint(jax.random.key(5), (B, L), 0, 16)


@functools.lru_cache(maxsize=None)
def _model_and_variables(router="topk", expert_reuse=1, chain=1, top_k=K, **router_kwargs):
  model = TransformerLM(vocab_size=16, num_layers=4, model_dim=D, num_heads=2, mlp_dim=16,
                        moe_every=2, expert_reuse=expert_reuse,
                        moe=dict(num_experts=E, top_k=top_k, hidden_dim=F, router=router,
                                 chain=chain, router_kwargs=router_kwargs))
  return model, model.init(jax.random.key(3), TOKENS)


def _router_inputs(model, variables):
  """{block: the router's input} through flax's method interceptor."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, routers.Router):
      seen[context.module.scope.path[0]] = np.asarray(args[0])
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(record):
    model.apply(variables, TOKENS)
  return seen


def test_recurrent_carry_crosses_dense_blocks_with_one_shared_cell():
  """MoE blocks 1 and 3 (a dense block between): block 3's state is the GRU of
  block 1's state with block 1's cell, the only one in the parameters."""
  model, variables = _model_and_variables("recurrent", hidden=6)
  params = _unbox(variables["params"])
  assert "gru" in params["block_1"]["moe"]["router"]
  assert "gru" not in params["block_3"]["moe"]["router"]
  _, aux = model.apply(variables, TOKENS)
  inputs = _router_inputs(model, variables)
  first, second = aux["layer_1"].carry, aux["layer_3"].carry
  cell = params["block_1"]["moe"]["router"]["gru"]
  x1 = inputs["block_1"].reshape(B * L, D)
  x3 = inputs["block_3"].reshape(B * L, D)
  h1 = _numpy_gru(cell, x1 @ params["block_1"]["moe"]["router"]["project"]["kernel"],
                  np.zeros((B * L, 6)))
  h3 = _numpy_gru(cell, x3 @ params["block_3"]["moe"]["router"]["project"]["kernel"], h1)
  np.testing.assert_allclose(first.state, h1, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(second.state, h3, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------- graph of tokens


def _graph_case(name, causal, **kwargs):
  router = routers.create(name, num_experts=E, top_k=K, normalize=True, **kwargs)
  x = jax.random.normal(jax.random.key(7), (B, L, D))
  segments = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  scores = jax.random.normal(jax.random.key(8), (B, L, L))
  attention = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((L, L), bool)), scores, -jnp.inf))
  ctx = RoutingContext(segment_ids=segments, causal=causal, attention=attention)
  variables = router.init(jax.random.key(9), x, ctx)
  out = router.apply(variables, x, ctx)
  w = _unbox(variables["params"])["gate"]["kernel"]
  p = _softmax(np.asarray(x).reshape(B * L, D) @ w).reshape(B, L, E)
  return out, np.asarray(x), np.asarray(segments), np.asarray(attention), p


@pytest.mark.parametrize("causal", [True, False])
def test_similarity_routing_mixes_over_visible_similar_tokens(causal):
  """p' = (1 - a) p + a S p with S = softmax_j(x_t.x_j / tau) over j <= t (causal)
  of t's segment; top-K of p', weights p' normalised over the K."""
  out, x, segments, _, p = _graph_case("similarity", causal, temperature=2.0, mix=0.7)
  want = np.zeros_like(p)
  for b in range(B):
    for t in range(L):
      if segments[b, t] == 0:
        continue
      seen = [j for j in range(L) if segments[b, j] == segments[b, t] and (j <= t or not causal)]
      s = _softmax(np.asarray([x[b, t] @ x[b, j] / 2.0 for j in seen]))
      want[b, t] = 0.3 * p[b, t] + 0.7 * sum(s_j * p[b, j] for s_j, j in zip(s, seen))
  real = segments.reshape(-1) > 0
  mixed = np.asarray(out.probs)
  np.testing.assert_allclose(mixed[real], want.reshape(-1, E)[real], rtol=1e-5, atol=1e-6)
  top = np.argsort(-want.reshape(-1, E), axis=-1)[:, :K]
  expert = np.asarray(out.plan.expert).reshape(-1, K)
  weight = np.asarray(out.plan.weight).reshape(-1, K)
  np.testing.assert_array_equal(np.sort(expert[real]), np.sort(top[real]))
  chosen = np.take_along_axis(want.reshape(-1, E), expert, axis=-1)[real]
  np.testing.assert_allclose(weight[real], chosen / chosen.sum(-1, keepdims=True), rtol=1e-5)
  assert not np.asarray(out.plan.valid).reshape(-1, K)[~real].any()


def test_attention_aware_routing_mixes_with_the_attention():
  """p' = A p (mix 1), A the given head-averaged attention, without its gradient."""
  out, _, segments, attention, p = _graph_case("attention_aware", True)
  want = np.einsum("btj,bje->bte", attention, p).reshape(-1, E)
  real = segments.reshape(-1) > 0
  np.testing.assert_allclose(np.asarray(out.probs)[real], want[real], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------- chain of experts


def test_chain_of_two_is_two_plain_layers_in_sequence():
  """CoE, I = 2: y = y_1 + y_2 with y_1 = MoE_1(x), y_2 = MoE_2(x + y_1), the two
  passes' experts the same, each with its own router; losses sum over passes."""
  x = jax.random.normal(jax.random.key(11), (B, L, D))
  chain = MoE(num_experts=E, top_k=1, hidden_dim=F, chain=2, engine="loop")
  variables = chain.init(jax.random.key(12), x)
  y, aux = chain.apply(variables, x)
  plain = MoE(num_experts=E, top_k=1, hidden_dim=F, engine="loop")
  params = variables["params"]
  first = {"params": {"router": params["router"], "experts": params["experts"]}}
  second = {"params": {"router": params["router_1"], "experts": params["experts"]}}
  y1, aux1 = plain.apply(first, x)
  y2, aux2 = plain.apply(second, x + y1)
  np.testing.assert_allclose(y, y1 + y2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux.loss, aux1.loss + aux2.loss, rtol=1e-6)
  np.testing.assert_allclose(aux.metrics["load"], (aux1.metrics["load"]
                                                   + aux2.metrics["load"]) / 2)
  # I = 1 is the plain layer: the same parameters and the same output.
  one = MoE(num_experts=E, top_k=1, hidden_dim=F, chain=1, engine="loop")
  assert jax.tree_util.tree_structure(one.init(jax.random.key(12), x)) == \
      jax.tree_util.tree_structure(first)
  np.testing.assert_array_equal(one.apply(first, x)[0], y1)


# --------------------------------------------------------------------- ReXMoE


def test_psr_candidate_schedule():
  """n(s) = E + floor((rE - E) clip((s - start) / steps, 0, 1)): E = 4, r = 3."""
  got = [int(psr_candidates(s, 4, 12, 10, 100)) for s in (0, 10, 34, 60, 109, 110, 500)]
  assert got == [4, 4, 5, 8, 11, 12, 12]
  assert int(psr_candidates(0, 4, 12, 0, 0)) == 12


def test_rexmoe_at_its_own_experts_is_the_plain_model():
  """At step 0 PSR leaves each layer its own E experts: the model equals the plain
  model whose layers hold their slices of the pool and the gates' first E columns
  (a layer's router orders the pool from its own experts)."""
  model, variables = _model_and_variables("rexmoe", expert_reuse=2, psr_steps=50)
  plain, plain_variables = _model_and_variables("topk")
  params = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(variables["params"]))
  target = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(plain_variables["params"]))
  for name, leaf in params.items():
    if name.startswith("block") or name in ("embed", "final_norm"):
      target[name] = jax.tree_util.tree_map(lambda a: a, leaf)
  for position, block in enumerate(("block_1", "block_3")):
    rows = slice(position * E, (position + 1) * E)
    target[block]["moe"]["experts"] = jax.tree_util.tree_map(
        lambda w: w[rows], params["expert_pool_0"])
    gate = params[block]["moe"]["router"]["gate"]["kernel"]
    target[block]["moe"]["router"]["gate"]["kernel"] = gate[:, :E]   # own experts first
  want_logits, want = plain.apply({"params": target}, TOKENS, step=jnp.asarray(0))
  got_logits, got = model.apply(variables, TOKENS, step=jnp.asarray(0))
  np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)
  for layer in want:
    np.testing.assert_allclose(got[layer].loss, want[layer].loss, rtol=1e-5)
  # Later in the schedule the second layer reaches into the pool's other half.
  _, late = model.apply(variables, TOKENS, step=jnp.asarray(50))
  assert int(jnp.max(late["layer_3"].plan.expert)) >= E or \
      int(jnp.max(late["layer_1"].plan.expert)) >= E


def test_rexmoe_pool_keeps_the_plain_models_expert_parameters():
  model, variables = _model_and_variables("rexmoe", expert_reuse=2, psr_steps=50)
  _, plain_variables = _model_and_variables("topk")
  count = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))
  params, plain = variables["params"], plain_variables["params"]
  pool = count(params["expert_pool_0"])
  assert pool == count(plain["block_1"]["moe"]["experts"]) + count(
      plain["block_3"]["moe"]["experts"])
  # Only the gates grow: D x rE instead of D x E in each of the 2 layers.
  assert count(params) - count(plain) == 2 * D * E


# --------------------------------------------------------------- the model


MODEL_CASES = {
    "recurrent": dict(router="recurrent", hidden=6),
    "similarity": dict(router="similarity"),
    "attention_aware": dict(router="attention_aware"),
    "chain": dict(router="topk", chain=2, top_k=1),
    "rexmoe": dict(router="rexmoe", expert_reuse=2, psr_steps=4),
}


@functools.lru_cache(maxsize=None)
def _jitted_model(case):
  model, variables = _model_and_variables(**MODEL_CASES[case])
  return jax.jit(lambda tokens, step: model.apply(variables, tokens, step=step)[0])


@pytest.mark.parametrize("case", list(MODEL_CASES))
@hypothesis.settings(max_examples=max(3, hypothesis.settings.default.max_examples // 3))
@hypothesis.given(seed=st.integers(0, 2**16), cut=st.integers(0, L - 2))
def test_the_model_stays_causal(case, seed, cut):
  """Changing the tokens after `cut` leaves every logit up to `cut` unchanged."""
  run = _jitted_model(case)
  tokens = jax.random.randint(jax.random.key(seed), (B, L), 0, 16)
  later = jnp.arange(L) > cut
  changed = jnp.where(later[None], (tokens + 1 + seed % 15) % 16, tokens)
  step = jnp.asarray(seed % 6)
  a, b = run(tokens, step), run(changed, step)
  np.testing.assert_allclose(a[:, :cut + 1], b[:, :cut + 1], rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(a[:, cut + 1:] - b[:, cut + 1:]))) > 0


@pytest.mark.parametrize("case", ["rexmoe"])
def test_expert_parallel_model_equals_one_device(case):
  """All-to-all expert parallelism over 2 x 4 devices (data x expert) gives the
  one-device logits and gradients: the pool, rolled into each layer's order, is
  sharded over the expert axis. (The other routers of this file run before the
  experts, so expert parallelism sees top-K plans; routers/ tests cover those.)"""
  settings = dict(MODEL_CASES[case])
  reuse = settings.pop("expert_reuse", 1)
  top_k = settings.pop("top_k", K)
  router, chain = settings.pop("router"), settings.pop("chain", 1)
  moe = dict(num_experts=E, top_k=top_k, hidden_dim=F, router=router, chain=chain,
             router_kwargs=settings)
  make = lambda **ep: TransformerLM(vocab_size=16, num_layers=2, model_dim=D, num_heads=2,
                                    mlp_dim=16, moe_every=1, expert_reuse=reuse,
                                    moe=dict(moe, **ep))
  reference, sharded = make(), make(expert_parallel=ExpertParallel())
  tokens = jax.random.randint(jax.random.key(13), (8, L), 0, 16)
  variables = jit_init(reference, jax.random.key(14), tokens)

  def loss(model):
    def f(params):
      logits, aux = model.apply({"params": params}, tokens, step=jnp.asarray(2))
      return jnp.sum(jax.nn.log_softmax(logits)[..., 3]) + sum(a.loss for a in aux.values())
    return jax.jit(jax.value_and_grad(f))(variables["params"])
  want_loss, want_grads = loss(reference)
  with jax.set_mesh(make_mesh(2, 4, 1)):
    got_loss, got_grads = loss(sharded)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  assert_trees_close(got_grads, want_grads, rtol=1e-4, atol=1e-5, what=case)


# ---------------------------------------------------------------- bad input


def test_bad_settings_name_their_field():
  with pytest.raises(ValueError, match="chain"):
    MoE(num_experts=E, hidden_dim=F, chain=0)
  with pytest.raises(ValueError, match=r"model.expert_reuse \(3\) must divide the number of "
                                       r"MoE layers \(2\)"):
    _model("rexmoe", expert_reuse=3)
  with pytest.raises(ValueError, match="psr_steps"):
    routers.create("rexmoe", num_experts=E, psr_steps=-1)
  with pytest.raises(ValueError, match="mix"):
    routers.create("similarity", num_experts=E, mix=1.5)
  with pytest.raises(ValueError, match="score must be 'softmax'"):
    routers.create("attention_aware", num_experts=E, score="sigmoid")
  with pytest.raises(ValueError, match="chain .2. > 1 needs"):
    MoE(num_experts=E, hidden_dim=F, chain=2, router_kwargs={"balance_scope": "global"})


def test_attention_aware_without_attention_is_one_clear_error():
  layer = MoE(num_experts=E, hidden_dim=F, router="attention_aware")
  with pytest.raises(ValueError, match=r"RoutingContext.attention"):
    layer.init(jax.random.key(0), jnp.ones((B, L, D)))


def test_recurrent_carry_between_layers_of_different_expert_counts_is_refused():
  x = jnp.ones((B, L, D))
  first = MoE(num_experts=E, hidden_dim=F, router="recurrent")
  (_, aux), _ = first.init_with_output(jax.random.key(0), x)
  second = MoE(num_experts=2 * E, hidden_dim=F, router="recurrent")
  with pytest.raises(ValueError, match=r"num_experts: the recurrent router's carry comes "
                                       r"from a MoE layer with num_experts 4, this layer has 8"):
    second.init(jax.random.key(1), x, RoutingContext(carry=aux.carry))
