"""The MoE layer end to end: engine parity through the router, aux, granularity,
shared experts and parameter annotations."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import MoE, balance, dispatch
from moejax.experts import FFNWeights, dense_matmul
from tests.helpers import assert_trees_close, jit_init

B, L, D = 2, 10, 12

LAYER_CASES = {
    "softmax-k2": dict(num_experts=8, top_k=2, hidden_dim=16),
    "mixtral-order": dict(num_experts=4, top_k=2, hidden_dim=8,
                          router_kwargs={"order": "topk_softmax"}),
    "sigmoid-grouped": dict(num_experts=8, top_k=2, hidden_dim=8,
                            router_kwargs={"score": "sigmoid", "normalize": True, "scale": 2.5,
                                           "num_groups": 4, "groups_selected": 2}),
    "capacity-score": dict(num_experts=4, top_k=2, hidden_dim=8, capacity_factor=0.5,
                           drop_policy="score", expert_type="mlp", activation="gelu"),
    "capacity-position": dict(num_experts=4, top_k=1, hidden_dim=8, capacity_factor=0.75),
    "fine-grained-shared": dict(num_experts=4, top_k=1, hidden_dim=16, granularity=2,
                                num_shared_experts=1),
    "noisy-jitter": dict(num_experts=4, top_k=2, hidden_dim=8,
                         router_kwargs={"noisy": True, "jitter": 0.1}),
}
ENGINES = [("einsum", "xla"), ("sorted", "xla"), ("sorted", "ragged_dot")]
# Cases that change only the router's scores give the engines the plan kind of
# softmax-k2: they run the default engine (sorted, xla); the others, every engine.
ROUTER_ONLY = ("mixtral-order", "sigmoid-grouped", "noisy-jitter")


def _value_and_grads(layer, variables, x, rngs):
  def loss(params, x):
    y, aux = layer.apply({"params": params}, x, deterministic=not rngs, rngs=rngs)
    return jnp.sum(jnp.tanh(y) * jnp.arange(D)) + aux.loss, (y, aux)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      variables["params"], x)


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_engines_match_loop(case):
  """Values and gradients for x, router and expert parameters equal the oracle's."""
  kwargs = LAYER_CASES[case]
  x = jax.random.normal(jax.random.PRNGKey(0), (B, L, D))
  rngs = {"router": jax.random.PRNGKey(5)} if case == "noisy-jitter" else {}
  oracle = MoE(engine="loop", **kwargs)
  variables = jit_init(oracle, jax.random.PRNGKey(1), x, deterministic=True)
  (want_loss, (want_y, want_aux)), want_grads = _value_and_grads(oracle, variables, x, rngs)
  # The router gradient is not trivially zero.
  router_grad = want_grads[0]["router"]["gate"]["kernel"]
  assert float(jnp.max(jnp.abs(nn.meta.unbox(router_grad)))) > 0
  for engine, backend in (ENGINES[1:2] if case in ROUTER_ONLY else ENGINES):
    layer = MoE(engine=engine, backend=backend, block_size=4, **kwargs)
    (got_loss, (got_y, got_aux)), got_grads = _value_and_grads(layer, variables, x, rngs)
    what = f"{case} {engine}/{backend}"
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5, err_msg=what)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, atol=1e-5, err_msg=what)
    assert_trees_close(got_grads, want_grads, rtol=1e-4, atol=1e-4, what=what)
    assert_trees_close(got_aux.metrics, want_aux.metrics, what=what)


def test_aux_losses_metrics_and_plan():
  layer = MoE(num_experts=4, top_k=2, hidden_dim=8, loss_weights={"switch": 0.5, "z": 0.25})
  x = jax.random.normal(jax.random.PRNGKey(2), (B, L, D))
  variables = layer.init(jax.random.PRNGKey(3), x)
  _, aux = layer.apply(variables, x)
  # The total is 0.5 * switch + 0.25 * z.
  np.testing.assert_allclose(aux.loss, 0.5 * aux.losses["switch"] + 0.25 * aux.losses["z"],
                             rtol=1e-6)
  # Recompute the switch loss from the returned plan and router probabilities.
  logits = x.reshape(-1, D) @ nn.meta.unbox(variables["params"]["router"]["gate"]["kernel"])
  probs = jax.nn.softmax(logits)
  expert_index = aux.plan.expert.reshape(B * L, 2)
  np.testing.assert_allclose(aux.losses["switch"], balance.switch_loss(probs, expert_index, 4),
                             rtol=1e-5)
  np.testing.assert_allclose(aux.losses["z"], balance.z_loss(logits), rtol=1e-5)
  load = np.bincount(np.asarray(aux.plan.expert), minlength=4)
  np.testing.assert_array_equal(aux.metrics["load"], load)
  mean = load.mean()
  np.testing.assert_allclose(aux.metrics["max_violation"], (load.max() - mean) / mean, rtol=1e-6)
  np.testing.assert_allclose(aux.metrics["experts_per_token"], 2.0)
  assert float(aux.metrics["dropped"]) == 0.0
  entropy = -np.sum(np.asarray(probs) * np.log(np.asarray(probs)), axis=-1).mean()
  np.testing.assert_allclose(aux.metrics["router_entropy"], entropy, rtol=1e-5)


def test_granularity_and_shared_experts():
  """m = 2 turns (E, K, F) = (4, 1, 16) into (8, 2, 8); one shared expert of width 8.

  y equals the routed output of the sorted engine plus a dense SwiGLU FFN with
  the shared weights.
  """
  layer = MoE(num_experts=4, top_k=1, hidden_dim=16, granularity=2, num_shared_experts=1)
  x = jax.random.normal(jax.random.PRNGKey(4), (B, L, D))
  variables = layer.init(jax.random.PRNGKey(5), x)
  params = nn.meta.unbox(variables["params"])
  assert params["experts"]["wi_gate"].shape == (8, D, 8)
  assert params["experts"]["wo"].shape == (8, 8, D)
  assert params["router"]["gate"]["kernel"].shape == (D, 8)
  assert params["shared_experts"]["wi_gate"].shape == (D, 8)
  y, aux = layer.apply(variables, x)
  assert aux.plan.num_slots == B * L * 2
  routed = MoE(num_experts=4, top_k=1, hidden_dim=16, granularity=2)
  y_routed, _ = routed.apply({"params": {k: v for k, v in variables["params"].items()
                                         if k != "shared_experts"}}, x)
  shared = FFNWeights(8).apply({"params": variables["params"]["shared_experts"]}, D)
  want = y_routed + shared(x.reshape(-1, D), dense_matmul).reshape(B, L, D)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_every_parameter_has_logical_axes():
  layer = MoE(num_experts=4, top_k=2, hidden_dim=8, num_shared_experts=1,
              router_kwargs={"noisy": True})
  x = jnp.zeros((1, 4, D))
  variables = layer.init(jax.random.PRNGKey(0), x, deterministic=True)
  boxes = jax.tree_util.tree_leaves(
      variables["params"], is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
  experts = variables["params"]["experts"]
  assert experts["wi_gate"].names == ("expert", "embed", "mlp")
  assert experts["wo"].names == ("expert", "mlp", "embed")
  assert variables["params"]["shared_experts"]["wo"].names == ("mlp", "embed")


def test_noise_only_in_training():
  layer = MoE(num_experts=4, top_k=2, hidden_dim=8, router_kwargs={"noisy": True})
  x = jax.random.normal(jax.random.PRNGKey(6), (B, L, D))
  variables = layer.init(jax.random.PRNGKey(7), x, deterministic=True)
  y1, _ = layer.apply(variables, x, deterministic=True)
  y2, _ = layer.apply(variables, x, deterministic=True)
  np.testing.assert_array_equal(y1, y2)
  a, _ = layer.apply(variables, x, deterministic=False, rngs={"router": jax.random.PRNGKey(1)})
  b, _ = layer.apply(variables, x, deterministic=False, rngs={"router": jax.random.PRNGKey(1)})
  c, _ = layer.apply(variables, x, deterministic=False, rngs={"router": jax.random.PRNGKey(2)})
  np.testing.assert_array_equal(a, b)
  assert float(jnp.max(jnp.abs(a - c))) > 0
  assert float(jnp.max(jnp.abs(a - y1))) > 0


def test_bfloat16_activations_keep_float32_router():
  layer = MoE(num_experts=4, top_k=2, hidden_dim=8, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.PRNGKey(8), (B, L, D)).astype(jnp.bfloat16)
  variables = layer.init(jax.random.PRNGKey(9), x)
  y, aux = layer.apply(variables, x)
  assert y.dtype == jnp.bfloat16
  assert aux.plan.weight.dtype == jnp.float32 and aux.loss.dtype == jnp.float32
  y32, _ = MoE(num_experts=4, top_k=2, hidden_dim=8).apply(variables, x.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=5e-2, atol=5e-2)


def test_engine_names():
  assert dispatch.names() == ["loop", "einsum", "sorted"]
