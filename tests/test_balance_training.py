"""Balancing inside training: global scope under data parallelism and gradient
accumulation, the aux-loss-free bias, ERC in the layer, and start-up errors.

8 simulated CPU devices (tests/conftest.py).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from helpers import assert_trees_close
from moejax import balance, metrics
from moejax.layer import MoE
from moejax.models import TransformerLM
from moejax.parallel import make_mesh
from moejax.routers.topk import TopKRouter
from moejax.train.state import TrainState
from moejax.train.step import make_train_step
from tests.helpers import jit_init

DEVICES, MICROBATCHES = 8, 4


# ----------------------------------------------------------------------------
# Global scope, function level: counts psum-ed over 8 devices and summed over
# 4 micro-batches, probabilities local, equal the one-device global batch.

def _top2(logits):
  probs = jax.nn.softmax(logits, axis=-1)
  return probs, jax.lax.top_k(probs, 2)[1]


def _sharded_step_loss(logits, scope):
  """Mean over devices and micro-batches of each piece's switch loss, and the
  gradient a data-parallel step gives (1 / devices of each device's own)."""
  mesh = Mesh(np.asarray(jax.devices()[:DEVICES]), ("data",))
  num_experts = logits.shape[-1]

  def device(local):                                   # [MB * rows, L, E]
    def device_loss(local):
      probs, experts = _top2(local.reshape(MICROBATCHES, -1, *local.shape[1:]))
      counts = balance.psum_counts(balance.selection_counts(experts, num_experts),
                                   ("data",) if scope == "global" else ())
      per_piece = jax.vmap(lambda p, i: balance.scoped_switch_loss(
          p, i, num_experts, scope=scope,
          global_counts=counts if scope == "global" else None))(probs, experts)
      return jnp.mean(per_piece)
    loss, grad = jax.value_and_grad(device_loss)(local)
    return jax.lax.pmean(loss, "data"), grad / DEVICES

  return jax.jit(jax.shard_map(device, mesh=mesh, in_specs=P("data"),
                               out_specs=(P(), P("data"))))(logits)


def test_global_scope_on_8_devices_by_4_microbatches_equals_the_global_batch():
  # 8 devices x 4 micro-batches x 2 rows of L = 4 tokens, E = 4, K = 2; the
  # logits favour a different expert on each device, so local counts differ.
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(DEVICES * MICROBATCHES * 2, 4, 4)).astype(np.float32)
  logits[np.arange(len(logits)), :, np.arange(len(logits)) // 8 % 4] += 2.0
  logits = jnp.asarray(logits)

  def one_device(logits):
    probs, experts = _top2(logits)
    return balance.switch_loss(probs.reshape(-1, 4), experts.reshape(-1, 2), 4)

  want, want_grad = jax.value_and_grad(one_device)(logits)
  got, got_grad = _sharded_step_loss(logits, "global")
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # The gradient, not just the value: it must not shrink by the 8 devices.
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-8)
  # Balancing each device's micro-batch on its own is another loss.
  local, local_grad = _sharded_step_loss(logits, "microbatch")
  assert abs(float(local) - float(want)) > 0.05
  assert np.max(np.abs(local_grad - want_grad)) > 10 * np.max(np.abs(want_grad)) * 1e-2


# ----------------------------------------------------------------------------
# Global scope, train-step level: the jitted step on an 8-device mesh with 4
# micro-batches takes the same update as one device on the whole batch.

MOE = {"num_experts": 4, "top_k": 2, "hidden_dim": 16, "block_size": 8,
       "loss_weights": {"switch": 1.0, "z": 0.0}}


def _lm(moe=MOE, **router):
  moe = {**moe, "router_kwargs": router}
  return TransformerLM(vocab_size=32, num_layers=2, model_dim=16, num_heads=2, mlp_dim=32,
                       moe=moe, moe_every=1)


def _batch(rows=32, length=9, seed=0):
  rng = np.random.default_rng(seed)
  # Each row favours its own band of token ids, so rows route differently.
  band = (np.arange(rows) % 4)[:, None] * 8
  tokens = (band + rng.integers(0, 8, size=(rows, length))) % 32
  return {"tokens": jnp.asarray(tokens, jnp.int32),
          "tokens_segment_ids": jnp.ones((rows, length), jnp.int32),
          "tokens_positions": jnp.broadcast_to(jnp.arange(length), (rows, length))}


def _state(model, tx, batch):
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch["tokens"][:, :-1])
  params = nn.meta.unbox(variables["params"])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    routing=variables.get("routing", {}))


def _run_step(model, tx, state, batch, devices, microbatches):
  """One train step with `devices` data-parallel devices and `microbatches` pieces."""
  step = make_train_step(model, tx, microbatches, data_shards=devices)
  mesh = make_mesh(data=devices, devices=jax.devices()[:devices])
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  state = jax.device_put(state, replicated)
  batch = jax.device_put(batch, rows)
  return jax.jit(step, in_shardings=(replicated, rows, None))(state, batch,
                                                              jax.random.PRNGKey(1))


def _updates(new_state, state):
  return jax.tree_util.tree_map(lambda a, b: a - b, new_state.params, state.params)


@pytest.mark.slow
def test_global_scope_train_step_on_8_devices_by_4_microbatches_equals_one_device():
  tx = optax.sgd(1.0)   # the update is minus the gradient
  batch = _batch()
  model = _lm(balance_scope="global")
  state = _state(model, tx, batch)
  one, one_metrics = _run_step(model, tx, state, batch, devices=1, microbatches=1)
  many, many_metrics = _run_step(model, tx, state, batch, DEVICES, MICROBATCHES)
  np.testing.assert_allclose(many_metrics["aux_loss"], one_metrics["aux_loss"], rtol=1e-5)
  np.testing.assert_allclose(many_metrics["loss"], one_metrics["loss"], rtol=1e-5)
  assert_trees_close(_updates(many, state), _updates(one, state), rtol=1e-4, atol=1e-6,
                     what="global scope update")
  # The micro-batch scope balances each device's 1-row pieces on their own: the
  # router's update differs.
  local = _lm(balance_scope="microbatch")
  local_new, local_metrics = _run_step(local, tx, state, batch, DEVICES, MICROBATCHES)
  assert abs(float(local_metrics["aux_loss"]) - float(one_metrics["aux_loss"])) > 0.05
  gate = lambda s: np.asarray(s.params["block_0"]["moe"]["router"]["gate"]["kernel"])
  difference = np.max(np.abs(gate(local_new) - gate(one)))
  assert difference > 100 * 1e-6, difference


# ----------------------------------------------------------------------------
# Aux-loss-free bias.

E, D, T = 8, 16, 1024


def _frozen_router_inputs(seed=0):
  """x [T, D] and a gate kernel [D, E] whose logits favour experts 0 and 1 by +2."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(T, D)).astype(np.float32)
  x[:, 0] = 1.0
  kernel = rng.normal(size=(D, E)).astype(np.float32) * 0.3
  kernel[0] = 0.0
  kernel[0, :2] = 2.0
  return jnp.asarray(x), {"gate": {"kernel": jnp.asarray(kernel)}}


def _balance_by_bias(router, x, params, steps):
  """Routes x, updates the bias, `steps` times; MaxVio of each routing and the state."""
  @jax.jit
  def step(routing):
    out, state = router.apply({"params": params, "routing": routing}, x, mutable=["routing"])
    _, state = router.apply({"params": params, **state}, method=TopKRouter.update_state,
                            mutable=["routing"])
    return state["routing"], metrics.max_violation(out.metrics["selected"])

  routing = jit_init(router, jax.random.PRNGKey(0), x)["routing"]
  history = []
  for _ in range(steps):
    routing, max_violation = step(routing)
    history.append(float(max_violation))
  return np.asarray(history), routing


@pytest.mark.parametrize("score,mode,rate,bound", [
    # Measured: below 0.1 after 125, 25, 28 and 5 updates.
    ("softmax", "sign", 2e-3, 200),
    ("softmax", "proportional", 2e-2, 60),
    ("sigmoid", "sign", 5e-3, 60),
    ("sigmoid", "proportional", 5e-2, 20),
])
def test_bias_updates_balance_frozen_logits_favouring_two_experts(score, mode, rate, bound):
  x, params = _frozen_router_inputs()
  router = TopKRouter(num_experts=E, top_k=2, score=score, normalize=True, aux_free=True,
                      bias_rate=rate, bias_update=mode)
  history, routing = _balance_by_bias(router, x, params, bound + 50)
  # Experts 0 and 1 start with most of the load: MaxVio near (3/8 - 1/8) / (1/8) = 2.
  assert history[0] > 1.5
  assert np.min(history[:bound]) < 0.1, history[:bound].min()
  assert np.max(history[-50:]) < 0.1, history[-50:]       # and it stays balanced
  bias = np.asarray(routing["bias"])
  assert bias[:2].max() < bias[2:].min()                   # favoured experts pushed down
  assert routing["counts"].dtype == jnp.float32
  np.testing.assert_array_equal(routing["counts"], 0)      # reset after the update

  # The combine weights are the unbiased scores, normalised over the K chosen.
  out = router.apply({"params": params, "routing": routing}, x)
  logits = x @ params["gate"]["kernel"]
  scores = jax.nn.sigmoid(logits) if score == "sigmoid" else jax.nn.softmax(logits)
  expert, weight = out.plan.expert.reshape(T, 2), out.plan.weight.reshape(T, 2)
  chosen = jnp.take_along_axis(scores, expert, axis=-1)
  np.testing.assert_allclose(weight, chosen / chosen.sum(-1, keepdims=True), rtol=1e-5)
  # ... while the selection is that of the biased scores.
  biased = jax.lax.top_k(scores + bias, 2)[1]
  np.testing.assert_array_equal(jnp.sort(expert, -1), jnp.sort(biased, -1))


def test_bias_selects_but_never_weights():
  # A bias of +10 on expert 7 makes every token choose it (K = 1), and its weight
  # is still its own unbiased softmax probability.
  x, params = _frozen_router_inputs()
  router = TopKRouter(num_experts=E, top_k=1, aux_free=True)
  routing = {"bias": jnp.zeros(E).at[7].set(10.0), "counts": jnp.zeros(E)}
  out = router.apply({"params": params, "routing": routing}, x)
  np.testing.assert_array_equal(out.plan.expert, 7)
  probs = jax.nn.softmax(x @ params["gate"]["kernel"])
  np.testing.assert_allclose(out.plan.weight, probs[:, 7], rtol=1e-6)
  np.testing.assert_array_equal(out.metrics["selected"], [0] * 7 + [T])


def test_bias_is_not_updated_without_a_mutable_routing_collection():
  # Inference: apply without mutable routing reads the bias and counts nothing.
  x, params = _frozen_router_inputs()
  router = TopKRouter(num_experts=E, top_k=2, aux_free=True)
  routing = router.init(jax.random.PRNGKey(0), x)["routing"]
  assert set(routing) == {"bias", "counts"}
  router.apply({"params": params, "routing": routing}, x)
  _, state = router.apply({"params": params, "routing": routing}, x, mutable=["routing"])
  np.testing.assert_array_equal(routing["counts"], 0)
  assert float(jnp.sum(state["routing"]["counts"])) == T * 2


@pytest.mark.slow
def test_train_step_updates_the_bias_from_the_global_step_counts():
  """On 8 devices x 4 micro-batches the bias moves by the counts of the whole
  batch, exactly as on one device, and the counts restart from zero."""
  rate = 0.1
  model = _lm(aux_free=True, bias_rate=rate)
  tx = optax.sgd(1.0)
  batch = _batch()
  state = _state(model, tx, batch)
  # The step counts, by hand: the initial model routing the whole batch.
  _, aux = jax.jit(model.apply)({"params": state.params, "routing": state.routing},
                                batch["tokens"][:, :-1])
  for devices, microbatches in ((1, 1), (DEVICES, MICROBATCHES)):
    new, _ = _run_step(model, tx, state, batch, devices, microbatches)
    for layer, a in aux.items():
      block = f"block_{layer.split('_')[1]}"
      routing = new.routing[block]["moe"]["router"]
      counts = a.metrics["selected"]
      assert float(jnp.sum(counts)) == 32 * 8 * 2          # rows * L * K
      np.testing.assert_allclose(routing["bias"], rate * np.sign(np.mean(counts) - counts),
                                 atol=1e-7, err_msg=f"{devices} devices, {layer}")
      np.testing.assert_array_equal(routing["counts"], 0)


def test_counts_stay_float32_with_bfloat16_activations():
  model = TransformerLM(vocab_size=32, num_layers=1, model_dim=16, num_heads=2, mlp_dim=32,
                        moe={**MOE, "router_kwargs": {"aux_free": True}}, dtype=jnp.bfloat16)
  tokens = _batch(rows=4)["tokens"][:, :-1]
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
  _, state = jax.jit(lambda v, t: model.apply(v, t, deterministic=False,
                                              mutable=["routing"]))(variables, tokens)
  router = state["routing"]["block_0"]["moe"]["router"]
  assert router["counts"].dtype == jnp.float32 and router["bias"].dtype == jnp.float32
  assert float(jnp.sum(router["counts"])) == 4 * 8 * 2


# ----------------------------------------------------------------------------
# Per-step load metrics.

def test_step_max_violation_is_that_of_the_summed_load():
  model = _lm()
  tx = optax.sgd(1e-9)
  batch = _batch()
  state = _state(model, tx, batch)
  _, step_metrics = jax.jit(make_train_step(model, tx, MICROBATCHES))(
      state, batch, jax.random.PRNGKey(1))
  # By hand: each quarter of the batch routed on its own.
  loads, violations = [], []
  apply = jax.jit(model.apply)
  for piece in range(MICROBATCHES):
    tokens = batch["tokens"][piece * 8:(piece + 1) * 8, :-1]
    _, aux = apply({"params": state.params}, tokens)
    loads.append(aux["layer_0"].metrics["load"])
    violations.append(aux["layer_0"].metrics["max_violation"])
  layer = step_metrics["layers"]["layer_0"]
  np.testing.assert_allclose(layer["load"], np.mean(loads, axis=0), rtol=1e-6)
  np.testing.assert_allclose(layer["max_violation"], np.mean(violations), rtol=1e-5)
  np.testing.assert_allclose(layer["step_max_violation"],
                             metrics.max_violation(np.sum(loads, axis=0)), rtol=1e-5)
  # With equal totals per piece, max of the sum <= sum of the maxima, so the step's
  # MaxVio is at most the pieces' mean MaxVio.
  assert float(layer["step_max_violation"]) <= float(layer["max_violation"]) + 1e-6


# ----------------------------------------------------------------------------
# ERC loss in the layer.

def _erc_layer(**kwargs):
  return MoE(num_experts=4, top_k=2, hidden_dim=8, block_size=8,
             loss_weights={"switch": 0.0, "erc": 1.0}, **kwargs)


def test_erc_activation_matrix_by_hand():
  layer = _erc_layer(erc_noise=0.0, expert_type="glu")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6))
  variables = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
  _, aux = jax.jit(layer.apply)(variables, x)
  p = nn.meta.unbox(variables["params"])
  proxies = np.asarray(p["router"]["gate"]["kernel"]).T          # [E, D]
  experts = p["experts"]
  norms = np.zeros((4, 4))
  for i in range(4):
    for j in range(4):
      gate = proxies[j] @ np.asarray(experts["wi_gate"][i])
      up = proxies[j] @ np.asarray(experts["wi_up"][i])
      norms[i, j] = np.linalg.norm(gate / (1 + np.exp(-gate)) * up)   # silu(gate) * up
  np.testing.assert_allclose(aux.losses["erc"], balance.erc_loss(jnp.asarray(norms)),
                             rtol=1e-5)
  share = balance.diagonal_dominance(jnp.asarray(norms))["erc_diagonal_share"]
  np.testing.assert_allclose(aux.metrics["erc_diagonal_share"], share)
  np.testing.assert_allclose(aux.loss, aux.losses["erc"], rtol=1e-6)   # weight 1, rest 0


def test_erc_gradient_reaches_router_and_expert_input_weights_only():
  layer = _erc_layer(erc_noise=0.0, expert_type="mlp")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6))
  params = nn.meta.unbox(jax.jit(layer.init)(jax.random.PRNGKey(1), x)["params"])
  grads = jax.jit(jax.grad(lambda p: layer.apply({"params": p}, x)[1].losses["erc"]))(params)
  assert float(jnp.max(jnp.abs(grads["router"]["gate"]["kernel"]))) > 0
  assert float(jnp.max(jnp.abs(grads["experts"]["wi"]))) > 0
  assert float(jnp.max(jnp.abs(grads["experts"]["wo"]))) == 0.0


def test_erc_noise_is_bounded_and_only_in_training():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6))
  noisy, clean = _erc_layer(erc_noise=0.3), _erc_layer(erc_noise=0.0)
  variables = jax.jit(clean.init)(jax.random.PRNGKey(1), x)
  want = jax.jit(clean.apply)(variables, x)[1].losses["erc"]
  np.testing.assert_allclose(
      jax.jit(lambda v: noisy.apply(v, x, deterministic=True))(variables)[1].losses["erc"],
      want, rtol=1e-6)
  train = jax.jit(lambda v, key: noisy.apply(v, x, deterministic=False,
                                             rngs={"router": key})[1].losses["erc"])
  trained = [train(variables, jax.random.PRNGKey(s)) for s in range(3)]
  assert len({float(v) for v in trained}) == 3 and all(float(v) != float(want)
                                                      for v in trained)
  with pytest.raises(ValueError, match="deterministic"):
    noisy.apply(variables, x)   # training noise needs an explicit mode


def test_layer_losses_are_computed_only_when_weighted():
  layer = MoE(num_experts=4, top_k=2, hidden_dim=8, block_size=8)
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 3, 6))
  variables = jit_init(layer, jax.random.PRNGKey(0), x)
  _, aux = layer.apply(variables, x)
  assert "erc" not in aux.losses and "erc_diagonal_share" not in aux.metrics
  assert "tsallis" not in aux.losses
  weighted = layer.clone(loss_weights={"switch": 1e-2, "z": 1e-3, "tsallis": 0.5})
  _, aux = weighted.apply(variables, x)
  probs = jax.nn.softmax(x.reshape(3, 6) @ nn.meta.unbox(
      variables["params"]["router"]["gate"]["kernel"]))
  want = jnp.mean(1.0 - jnp.sum(probs ** 2, axis=-1))     # S_2 = 1 - sum_e p^2, q = 2
  np.testing.assert_allclose(aux.losses["tsallis"], want, rtol=1e-5)
  np.testing.assert_allclose(aux.loss, 1e-2 * aux.losses["switch"] + 1e-3 * aux.losses["z"]
                             + 0.5 * want, rtol=1e-5)


# ----------------------------------------------------------------------------
# Bad settings name their field, in the layer and at start-up from a config.

@pytest.mark.parametrize("kwargs,field", [
    ({"router_kwargs": {"balance_scope": "batch"}}, "balance_scope"),
    ({"router_kwargs": {"bias_rate": -1e-3}}, "bias_rate"),
    ({"router_kwargs": {"bias_update": "momentum"}}, "bias_update"),
    ({"loss_weights": {"switch": -0.01}}, "loss_weights.switch"),
    ({"loss_weights": {"erc": -1.0}}, "loss_weights.erc"),
    ({"loss_weights": {"tsallis": -1.0}}, "loss_weights.tsallis"),
    ({"loss_weights": {"entropy": 1.0}}, "loss_weights.entropy is 1.0, but neither router "
                                         "'topk' nor the layer returns a loss named 'entropy'"),
    ({"tsallis_q": 0.0}, "tsallis_q"),
    ({"tsallis_q": -2.0}, "tsallis_q"),
    ({"erc_noise": 1.0}, "erc_noise"),
    ({"erc_form": "hinge"}, "erc_form"),
    ({"erc_margin": 0.0}, "erc_margin"),
])
def test_bad_balance_settings_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    MoE(num_experts=4, hidden_dim=8, **kwargs)


@pytest.mark.parametrize("overrides,field", [
    ({"moe.topk.balance_scope": "batch"}, "moe.topk.balance_scope"),
    ({"moe.topk.bias_rate": -0.1}, "moe.topk.bias_rate"),
    ({"moe.loss_weights.switch": -0.01}, "moe.loss_weights.switch"),
    ({"moe.tsallis_q": 0.0}, "moe.tsallis_q"),
    ({"moe.erc_noise": -0.5}, "moe.erc_noise"),
])
def test_bad_balance_config_fails_at_start_up_naming_the_field(overrides, field):
  from helpers import tiny_config  # pylint: disable=g-import-not-at-top
  from moejax.train import setup  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    setup.check(tiny_config("/nonexistent", **overrides))
