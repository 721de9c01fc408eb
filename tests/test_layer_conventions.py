"""The MoE layer follows Flax's conventions, so it drops into a model written by
others: sown losses (no tuple to plumb, nothing counted twice), dtype from the
input, a named rng stream, per-expert kernel_init, biases and hidden dropout,
[T, D] inputs, capacity off for decoding, router state updated anywhere, and the
model's own mesh rules."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
import pallas_kernels
from moejax import MoE, RoutingContext
from moejax.experts import ExpertFFN
from moejax.parallel import expert_rules
from tests.helpers import assert_trees_close, jit_init

B, L, D, E = 2, 8, 16, 4


def _x(seed=0, shape=(B, L, D), dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(seed), shape).astype(dtype)


def _layer(**kwargs):
  kwargs = {"num_experts": E, "hidden_dim": 32, "top_k": 2, "block_size": 8, **kwargs}
  return MoE(**kwargs)


# ---------------------------------------------------------------------------
# aux="sow"

class TwoMoE(nn.Module):
  """A compact model with two MoE layers in place of MLP blocks."""
  router_kwargs: dict

  @nn.compact
  def __call__(self, x):
    for _ in range(2):
      x = x + _layer(aux="sow", router_kwargs=self.router_kwargs,
                     loss_weights={"switch": 1e-2, "z": 1e-3})(x)
    return x


def test_sown_losses_sum_the_layers_and_are_never_counted_twice():
  x = _x()
  model = TwoMoE({"aux_free": True})
  variables = jit_init(model, jax.random.PRNGKey(1), x)
  assert set(variables) == {"params", "routing"}          # nothing sown at init
  assert moejax.carried_collections(variables) == ("routing",)
  y, mutated = model.apply(variables, x, mutable=["routing", *moejax.SOWN])
  aux = moejax.sown_aux(mutated)
  # The same layers with the tuple return: the sum of their aux.loss.
  h, want = x, 0.0
  for i in range(2):
    layer = _layer(router_kwargs={"aux_free": True}, loss_weights={"switch": 1e-2, "z": 1e-3})
    out, layer_aux = layer.apply({c: variables[c][f"MoE_{i}"] for c in variables}, h)
    h, want = h + out, want + float(layer_aux.loss)
  np.testing.assert_allclose(y, h, rtol=1e-6)
  np.testing.assert_allclose(float(aux.loss), want, rtol=1e-6)
  assert set(aux.metrics) == {"MoE_0", "MoE_1"}
  assert float(aux.metrics["MoE_1"]["experts_per_token"]) == 2.0
  assert set(aux.state) == {"routing"}
  # Passing apply's own state back (as a step does) counts nothing twice.
  _, again = model.apply({**variables, **aux.state}, x, mutable=["routing", *moejax.SOWN])
  np.testing.assert_allclose(float(moejax.sown_aux(again).loss), want, rtol=1e-6)
  # Not mutable: the layer still returns y alone.
  np.testing.assert_allclose(model.apply(variables, x), y, rtol=1e-6)


def test_aux_and_dropout_rate_are_checked():
  with pytest.raises(ValueError, match="aux must be one of"):
    _layer(aux="tuple")
  with pytest.raises(ValueError, match="dropout_rate"):
    _layer(dropout_rate=1.0)
  with pytest.raises(ValueError, match="router_kwargs.rng_name is set by the layer"):
    _layer(router_kwargs={"rng_name": "x"})


# ---------------------------------------------------------------------------
# dtype, rng stream, [T, D]

def test_dtype_follows_the_input_unless_set():
  x = _x(dtype=jnp.bfloat16)
  layer = _layer()
  variables = layer.init(jax.random.PRNGKey(1), x)
  y, _ = layer.apply(variables, x)
  assert y.dtype == jnp.bfloat16
  assert layer.apply(variables, x.astype(jnp.float32))[0].dtype == jnp.float32
  assert _layer(dtype=jnp.float32).apply(variables, x)[0].dtype == jnp.float32
  assert jax.tree_util.tree_leaves(variables)[0].dtype == jnp.float32     # param_dtype


def test_router_noise_and_erc_draw_from_the_named_rng_stream():
  x = _x()
  layer = _layer(router_kwargs={"noisy": True}, rng_name="dropout",
                 loss_weights={"erc": 1.0, "z": 1e-3})
  variables = layer.init(jax.random.PRNGKey(1), x, deterministic=True)
  run = lambda seed: layer.apply(variables, x, deterministic=False,
                                 rngs={"dropout": jax.random.PRNGKey(seed)})
  (y1, aux1), (y2, _), (y3, _) = run(3), run(3), run(4)
  np.testing.assert_array_equal(y1, y2)
  assert float(jnp.max(jnp.abs(y1 - y3))) > 0
  assert float(aux1.losses["erc"]) > 0
  with pytest.raises(Exception, match='needs PRNG for "dropout"'):
    layer.apply(variables, x, deterministic=False)


def test_token_matrix_and_extra_leading_axes_route_as_one_batch():
  x = _x()
  layer = _layer()
  variables = layer.init(jax.random.PRNGKey(1), x)
  y, _ = layer.apply(variables, x)
  flat, aux = layer.apply(variables, x.reshape(B * L, D))         # [T, D]: one row
  assert flat.shape == (B * L, D)
  np.testing.assert_allclose(flat, layer.apply(variables, x.reshape(1, B * L, D))[0].reshape(
      B * L, D), rtol=1e-6)
  np.testing.assert_allclose(flat, y.reshape(B * L, D), rtol=1e-5, atol=1e-6)  # dropless
  four, _ = layer.apply(variables, x.reshape(1, B, L, D))
  np.testing.assert_allclose(four.reshape(B, L, D), y, rtol=1e-6)
  with pytest.raises(ValueError, match=r"x must be \[B, L, D\] or \[T, D\]"):
    layer.apply(variables, x[0, 0])


# ---------------------------------------------------------------------------
# Expert options: kernel_init per expert, biases, hidden dropout

def test_kernel_init_is_applied_to_each_expert_with_its_own_key():
  # lecun_normal on one expert's [D, F]: variance 1/D. On the stack [E, D, F]
  # as one array it would be 1/(E*D).
  dim, experts = 64, 8
  layer = MoE(num_experts=experts, hidden_dim=64, top_k=2, expert_type="mlp",
              kernel_init=nn.initializers.lecun_normal())
  params = nn.unbox(jit_init(layer, jax.random.PRNGKey(1), _x(shape=(1, 4, dim)))["params"])
  wi = np.asarray(params["experts"]["wi"])
  assert wi.shape == (experts, dim, 64)
  np.testing.assert_allclose(wi.var(axis=(1, 2)), 1 / dim, rtol=0.15)
  assert not np.allclose(wi[0], wi[1])
  np.testing.assert_allclose(np.asarray(params["experts"]["wo"]).var(), 1 / 64, rtol=0.15)


ENGINES = [("einsum", "xla"), ("sorted", "xla"), ("sorted", "ragged_dot"),
           ("sorted", "pallas")]
PALLAS = pallas_kernels.KernelSettings(tiling=pallas_kernels.GmmTiling.uniform(8, 8, 8),
                                       combine_tiles=pallas_kernels.CombineTiles(8, 8, 8))


def test_expert_biases_on_every_engine_equal_the_loop_and_a_hand_computation():
  x = _x()
  oracle = _layer(engine="loop", use_bias=True, bias_init=nn.initializers.normal(1.0),
                  expert_type="mlp", activation="relu", num_shared_experts=1)
  variables = oracle.init(jax.random.PRNGKey(1), x)

  def loss(layer):
    def f(params):
      y, aux = layer.apply({"params": params}, x)
      return jnp.sum(jnp.sin(y)) + aux.loss
    return jax.jit(jax.value_and_grad(f))(variables["params"])

  want, want_grads = loss(oracle)
  for engine, backend in ENGINES:
    layer = oracle.clone(engine=engine, backend=backend,
                         kernel_settings=PALLAS if backend == "pallas" else None)
    got, grads = loss(layer)
    np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"{engine}/{backend}")
    assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-5, what=f"{engine}/{backend}")
  # By hand: y_t = sum_k g_tk (relu(x_t W_i[e] + b_i[e]) W_o[e] + b_o[e]) + shared.
  y, aux = oracle.apply(variables, x)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), nn.unbox(variables["params"]))
  ex, sh = p["experts"], p["shared_experts"]
  tokens = np.asarray(x.reshape(-1, D), np.float64)
  want_y = np.maximum(tokens @ sh["wi"] + sh["b_wi"], 0) @ sh["wo"] + sh["b_wo"]
  plan = aux.plan
  for t, e, g, ok in zip(*(np.asarray(a) for a in (plan.token, plan.expert, plan.weight,
                                                    plan.valid))):
    if ok:
      h = np.maximum(tokens[t] @ ex["wi"][e] + ex["b_wi"][e], 0)
      want_y[t] += g * (h @ ex["wo"][e] + ex["b_wo"][e])
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want_y, rtol=1e-4, atol=1e-5)


def test_hidden_dropout_zeroes_a_share_of_the_activation_and_rescales_the_rest():
  rng = np.random.default_rng(0)
  w = {"wi": jnp.asarray(rng.normal(size=(1, 8, 512)), jnp.float32),
       "wo": jnp.zeros((1, 512, 8), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
  plain = ExpertFFN(weights=w, activation="gelu", glu=False)
  matmul = lambda h, v: h @ v[0]
  h = np.asarray(plain.hidden(x, matmul))
  dropped = np.asarray(plain.replace(dropout_rate=0.25, dropout_key=jax.random.PRNGKey(0))
                       .hidden(x, matmul))
  live = h != 0                                                 # gelu underflows to 0
  zero = (dropped == 0) & live
  assert abs(zero.sum() / live.sum() - 0.25) < 0.01             # about 30000 entries
  kept = live & ~zero
  np.testing.assert_allclose(dropped[kept], h[kept] / 0.75, rtol=1e-6)
  # In the layer: training with dropout differs, evaluation does not.
  layer = _layer(dropout_rate=0.5)
  xs = _x()
  variables = layer.init(jax.random.PRNGKey(1), xs)
  train = layer.apply(variables, xs, deterministic=False,
                      rngs={"dropout": jax.random.PRNGKey(2)})[0]
  np.testing.assert_array_equal(layer.apply(variables, xs)[0],
                                _layer().apply(variables, xs)[0])
  assert float(jnp.max(jnp.abs(train - layer.apply(variables, xs)[0]))) > 1e-3


# ---------------------------------------------------------------------------
# Decoding

def test_decode_turns_capacity_off_so_one_token_routes_as_in_the_full_forward():
  x = _x()
  layer = _layer(top_k=1, capacity_factor=0.5)
  variables = layer.init(jax.random.PRNGKey(1), x)
  _, trained = layer.apply(variables, x)
  assert float(trained.metrics["dropped"]) > 0                  # C from T = 16: drops
  full, aux = layer.apply(variables, x, decode=True)
  assert float(aux.metrics["dropped"]) == 0
  np.testing.assert_allclose(full, _layer(top_k=1).apply(variables, x)[0], rtol=1e-6)
  decode_step = jax.jit(layer.clone(decode=True).apply)
  for p in range(L):                                           # one position at a time
    step, _ = decode_step(variables, x[:, p:p + 1])
    np.testing.assert_allclose(step[:, 0], full[:, p], rtol=1e-5, atol=1e-6)


def test_random_routing_at_evaluation_depends_on_row_and_position_not_batch_length():
  x = _x()
  layer = _layer(router="random", router_kwargs={"draw": "per_token"}, deterministic=True)
  variables = layer.init(jax.random.PRNGKey(1), x)
  _, full = layer.apply(variables, x)
  experts = np.asarray(full.plan.expert).reshape(B, L, 2)
  one_position = jax.jit(layer.apply)
  for p in (0, 3, 7):
    ctx = RoutingContext(positions=jnp.full((B, 1), p))
    _, one = one_position(variables, x[:, p:p + 1], ctx)
    np.testing.assert_array_equal(np.asarray(one.plan.expert).reshape(B, 2), experts[:, p])
  assert len({tuple(row) for row in experts.reshape(-1, 2)}) > 3   # still varies by token


# ---------------------------------------------------------------------------
# Router state anywhere; the model's own rules

def test_routing_updater_updates_every_moe_in_a_compact_model():
  x = _x()
  model = TwoMoE({"aux_free": True, "bias_rate": 0.5})
  variables = model.init(jax.random.PRNGKey(1), x)
  _, mutated = model.apply(variables, x, mutable=["routing", *moejax.SOWN])
  variables = {**variables, **moejax.sown_aux(mutated).state}
  layers = moejax.find_moe_layers(model, x)
  assert sorted(layers) == [("MoE_0",), ("MoE_1",)]
  updated = jax.jit(moejax.routing_updater(model, x))(variables)
  for i in range(2):
    state = variables["routing"][f"MoE_{i}"]["router"]
    counts = np.asarray(state["counts"])
    assert counts.sum() == B * L * 2
    new = updated["routing"][f"MoE_{i}"]["router"]
    np.testing.assert_allclose(new["bias"], 0.5 * np.sign(counts.mean() - counts), atol=1e-7)
    np.testing.assert_array_equal(new["counts"], 0)
  assert_trees_close(updated["params"], variables["params"], rtol=0, atol=0, what="params")
  # A model without routing state is returned as it is.
  plain = TwoMoE({})
  plain_vars = plain.init(jax.random.PRNGKey(1), x)
  assert moejax.carried_collections(plain_vars) == ()
  assert moejax.routing_updater(plain, x)(plain_vars).keys() == plain_vars.keys()


def test_expert_rules_join_a_models_own_rules_on_its_own_mesh():
  rules = (("batch", ("data", "fsdp", "expert")), ("embed", "fsdp"), ("mlp", "tensor"))
  rules = rules + expert_rules("expert")
  layer = _layer()
  abstract = jax.eval_shape(layer.init, jax.random.PRNGKey(1), _x())
  mesh = jax.make_mesh((1, 2, 2, 2), ("data", "fsdp", "tensor", "expert"),
                       devices=jax.devices()[:8])
  specs = nn.get_partition_spec(abstract)["params"]
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  assert tuple(shardings["experts"]["wi_gate"].spec) == ("expert", "fsdp", "tensor")
  assert tuple(shardings["experts"]["wo"].spec) == ("expert", "tensor", "fsdp")
  assert expert_rules() == (("expert", "expert"),)


def test_capture_intermediates_records_the_layers_output():
  """A filter on MoE modules (Flax's capture_intermediates) sees the layer's calls,
  not its helpers, and building the router is no method call."""
  x = _x()
  model = TwoMoE({})
  variables = jit_init(model, jax.random.PRNGKey(1), x)
  y, state = model.apply(variables, x, mutable=["intermediates"],
                         capture_intermediates=lambda m, _: isinstance(m, MoE))
  captured = state["intermediates"]["MoE_1"]
  assert set(captured) == {"__call__", "setup"}
  np.testing.assert_allclose(y, x + state["intermediates"]["MoE_0"]["__call__"][0]
                             + captured["__call__"][0], rtol=1e-5, atol=1e-6)
