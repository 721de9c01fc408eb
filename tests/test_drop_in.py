"""moejax.MoE as a drop-in MLP block of a small decoder-only LM written the way
the Flax lm1b example writes its model: its own config dataclass, its own
logical axis names and mesh ('data', 'fsdp', 'tensor', 'expert'), an
autoregressive cache for decoding, and a train step that passes only a
'dropout' rng. The MLP is swapped for MoE(..., aux="sow") called with a
RoutingContext, and the train step adds moejax.sown_aux(mutated).loss.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

import moejax
from moejax import routers
from moejax.parallel import ExpertParallel, expert_rules
from tests.helpers import assert_trees_close

VOCAB, B, L = 32, 2, 8

MESH_AXES = ("data", "fsdp", "tensor", "expert")
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
) + expert_rules("expert")

EXPERT_PARALLEL = ExpertParallel(batch_axes=("data", "fsdp", "expert"), expert_axis="expert",
                                 model_axis="tensor")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters of the decoder; `moe_decode` None routes for decoding
  exactly when `decode` is set."""

  vocab_size: int = VOCAB
  emb_dim: int = 16
  num_heads: int = 2
  num_layers: int = 2
  max_len: int = L
  num_experts: int = 4
  top_k: int = 2
  expert_dim: int = 32
  router: str = "topk"
  router_kwargs: Mapping[str, Any] = FrozenDict()
  capacity_factor: Optional[float] = None
  expert_parallel: Optional[ExpertParallel] = None
  kernel_init: Optional[Callable[..., Any]] = None
  use_bias: bool = False
  dtype: Any = jnp.float32
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  deterministic: bool = False
  decode: bool = False
  moe_decode: Optional[bool] = None
  logical_axis_rules: tuple = LOGICAL_AXIS_RULES

  def replace(self, **changes) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)

  @property
  def route_for_decode(self) -> bool:
    return self.decode if self.moe_decode is None else self.moe_decode


def shift_right(x: jax.Array) -> jax.Array:
  """Inputs of a language model: the targets moved one place right, 0 first."""
  return jnp.pad(x, ((0, 0), (1, 0)))[:, :-1]


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets))


def logical(init, axes):
  return nn.with_logical_partitioning(init, axes)


class AddPositionEmbs(nn.Module):
  """Learned position embeddings; in decode mode one position per call, read from
  a counter in the 'cache' collection. Returns the sum and the positions [B, L]."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    batch, length = x.shape[:2]
    table = self.param("pos_embedding", logical(nn.initializers.normal(0.02),
                                                ("length", "embed")),
                       (cfg.max_len, cfg.emb_dim))
    if cfg.decode:
      initialized = self.has_variable("cache", "cache_index")
      index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      if initialized:
        i = index.value
        index.value = i + 1
        positions = jnp.full((batch, 1), i, jnp.int32)
        return x + jax.lax.dynamic_slice_in_dim(table, i, 1)[None].astype(x.dtype), positions
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return x + table[None, :length].astype(x.dtype), positions


class DecoderBlock(nn.Module):
  """Pre-norm block: causal self-attention, then the MoE feed-forward."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x, ctx: moejax.RoutingContext, mask=None):
    cfg = self.config
    norm = functools.partial(nn.LayerNorm, dtype=cfg.dtype,
                             scale_init=logical(nn.initializers.ones, ("embed",)),
                             bias_init=logical(nn.initializers.zeros, ("embed",)))
    y = norm()(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=cfg.num_heads, dtype=cfg.dtype, use_bias=False, broadcast_dropout=False,
        kernel_init=logical(nn.initializers.xavier_uniform(), ("embed", "heads", "kv")),
        out_kernel_init=logical(nn.initializers.xavier_uniform(), ("heads", "kv", "embed")),
        dropout_rate=cfg.attention_dropout_rate, deterministic=cfg.deterministic,
        decode=cfg.decode)(y, mask=mask)
    y = nn.Dropout(rate=cfg.dropout_rate)(y, deterministic=cfg.deterministic)
    x = x + y
    z = norm()(x)
    z = moejax.MoE(
        num_experts=cfg.num_experts, top_k=cfg.top_k, hidden_dim=cfg.expert_dim,
        router=cfg.router, router_kwargs=cfg.router_kwargs,
        capacity_factor=cfg.capacity_factor, kernel_init=cfg.kernel_init,
        use_bias=cfg.use_bias, aux="sow", dtype=cfg.dtype, rng_name="dropout",
        dropout_rate=cfg.dropout_rate, decode=cfg.route_for_decode,
        expert_parallel=cfg.expert_parallel, name="moe",
    )(z, ctx, deterministic=cfg.deterministic)
    z = nn.Dropout(rate=cfg.dropout_rate)(z, deterministic=cfg.deterministic)
    return x + z


class TransformerLM(nn.Module):
  """Decoder-only LM: inputs [B, L] int -> logits [B, L, V]. Trained on the
  targets themselves (shifted right inside); in decode mode fed one token
  (already shifted) per call."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, inputs):
    cfg = self.config
    y = inputs if cfg.decode else shift_right(inputs)
    mask = None if cfg.decode else nn.make_causal_mask(inputs)
    x = nn.Embed(cfg.vocab_size, cfg.emb_dim,
                 embedding_init=logical(nn.initializers.normal(1.0), ("vocab", "embed")))(y)
    x, positions = AddPositionEmbs(cfg)(x)
    x = nn.Dropout(rate=cfg.dropout_rate)(x, deterministic=cfg.deterministic)
    x = x.astype(cfg.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"),
                                   rules=cfg.logical_axis_rules)
    ctx = moejax.RoutingContext(causal=True, positions=positions, token_ids=y)
    for i in range(cfg.num_layers):
      x = DecoderBlock(cfg, name=f"block_{i}")(x, ctx.replace(layer=i), mask)
    x = nn.LayerNorm(dtype=cfg.dtype, scale_init=logical(nn.initializers.ones, ("embed",)),
                     bias_init=logical(nn.initializers.zeros, ("embed",)))(x)
    return nn.Dense(cfg.vocab_size, dtype=cfg.dtype, name="logitdense",
                    kernel_init=logical(nn.initializers.xavier_uniform(), ("embed", "vocab")),
                    bias_init=logical(nn.initializers.zeros, ("vocab",)))(x)


def synthetic_tokens(batch: int = B, length: int = L, seed: int = 0) -> jax.Array:
  """Counting sequences: each row starts anywhere and steps by 1 (ids 1..V-1)."""
  start = np.random.default_rng(seed).integers(1, VOCAB, size=(batch, 1))
  return jnp.asarray((start + np.arange(length) - 1) % (VOCAB - 1) + 1, jnp.int32)


def make_train_step(model: TransformerLM, tx, carried: tuple[str, ...], update):
  """lm1b's train step with the MoE's sown loss added and its routing state carried."""

  def step(params, state, opt_state, batch, key):
    def loss_fn(params):
      logits, mutated = model.apply({"params": params, **state}, batch,
                                    rngs={"dropout": key},
                                    mutable=[*carried, *moejax.SOWN])
      loss = cross_entropy(logits, batch) + moejax.sown_aux(mutated).loss
      return loss, {c: mutated[c] for c in carried}

    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    variables = update({"params": params, **state})
    return variables["params"], {c: variables[c] for c in carried}, opt_state, loss

  return step


def train(model: TransformerLM, tx, batch: jax.Array, steps: int, update=None):
  """Init, then `steps` train steps on one batch, in one program: (initial
  variables, final variables, losses)."""
  carried = moejax.carried_collections(jax.eval_shape(model.init, jax.random.key(0), batch))
  step = make_train_step(model, tx, carried, update or (lambda v: v))

  @jax.jit
  def run(key, batch):
    variables = nn.meta.unbox(model.init(key, batch))
    state = {c: variables[c] for c in carried}

    def one(carry, key):
      params, state, opt_state = carry
      params, state, opt_state, loss = step(params, state, opt_state, batch, key)
      return (params, state, opt_state), loss

    (params, state, _), losses = jax.lax.scan(
        one, (variables["params"], state, tx.init(variables["params"])),
        jax.random.split(jax.random.fold_in(key, 1), steps))
    return variables, {"params": params, **state}, losses

  return run(jax.random.key(0), batch)


TRAINED = TransformerConfig(router_kwargs=FrozenDict({"aux_free": True}), dropout_rate=0.1,
                            kernel_init=nn.initializers.xavier_uniform(), use_bias=True)


@functools.lru_cache(maxsize=None)
def trained():
  """20 Adam steps of the TRAINED model on one batch: (initial variables, final
  variables, losses)."""
  model = TransformerLM(TRAINED)
  batch = synthetic_tokens(batch=8)
  return train(model, optax.adam(1e-2), batch, steps=20,
               update=moejax.routing_updater(model, batch))


def test_training_loss_falls():
  """20 Adam steps with dropout and the sown aux loss lower the LM loss clearly,
  and the aux-free router bias, carried in `routing`, moves off zero."""
  initial, final, losses = trained()
  assert moejax.carried_collections(initial) == ("routing",)
  losses = np.asarray(losses)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses
  for i in range(TRAINED.num_layers):
    before = initial["routing"][f"block_{i}"]["moe"]["router"]
    after = final["routing"][f"block_{i}"]["moe"]["router"]
    np.testing.assert_array_equal(before["bias"], 0)
    assert np.any(np.asarray(after["bias"]) != 0), after
    np.testing.assert_array_equal(after["counts"], 0)


def test_mlp_block_options():
  """The MLP block's usual options reach the experts: an xavier_uniform kernel
  init (per expert), biases b_wi_*/b_wo, and hidden dropout; training has finite
  losses and moves the biases."""
  initial, final, losses = trained()
  assert np.all(np.isfinite(np.asarray(losses)))
  assert TRAINED.dropout_rate > 0 and not TRAINED.deterministic
  experts = initial["params"]["block_0"]["moe"]["experts"]
  assert {"wi_gate", "wi_up", "wo", "b_wi_gate", "b_wi_up", "b_wo"} <= set(experts)
  limit = np.sqrt(6 / (TRAINED.emb_dim + TRAINED.expert_dim))
  wi = np.asarray(experts["wi_gate"])
  assert np.max(np.abs(wi)) <= limit and np.std(wi) > 0.8 * limit / np.sqrt(3)
  np.testing.assert_array_equal(experts["b_wo"], 0)
  moved = final["params"]["block_0"]["moe"]["experts"]
  assert np.any(np.asarray(moved["b_wo"]) != 0)
  assert np.any(np.asarray(moved["b_wi_gate"]) != 0)


CAUSAL_ROUTERS = [n for n in routers.names()
                  if routers.create(n, num_experts=4, top_k=2).is_causal
                  and not routers.get(n).reads_earlier_tokens]


@pytest.mark.parametrize("router", [n for n in routers.names()
                                    if routers.get(n).reads_earlier_tokens])
def test_decode_refuses_routers_that_read_earlier_tokens(router):
  layer = moejax.MoE(num_experts=4, top_k=2, hidden_dim=8, router=router, decode=True)
  with pytest.raises(ValueError, match=f"decode is True, but router '{router}' routes each "
                                       "token by the earlier tokens of its sequence"):
    layer.init(jax.random.key(0), jnp.ones((1, 1, 8)))


def full_and_cached_logits(cfg: TransformerConfig, tokens: jax.Array):
  """(logits of the full forward, logits of cached decoding one token at a time)
  of one set of parameters; the full forward routes as the cached decoding does."""
  cached = TransformerLM(cfg.replace(decode=True))
  full = TransformerLM(cfg.replace(decode=False, moe_decode=cached.config.route_for_decode))
  cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                       jax.eval_shape(cached.init, jax.random.key(0), tokens)["cache"])

  @jax.jit
  def run(key, tokens):
    want, variables = full.init_with_output(key, tokens)

    def one(cache, token):
      logits, mutated = cached.apply({**variables, "cache": cache}, token[:, None],
                                     mutable=["cache"])
      return mutated["cache"], logits[:, 0]

    _, got = jax.lax.scan(one, cache, shift_right(tokens).T)
    return want, jnp.swapaxes(got, 0, 1)

  return run(jax.random.key(1), tokens)


# One causal router per kind of context a token's routing reads, beyond its own x:
# none (topk; relu, top_p, null_experts and random route from x or a seed alone
# as it does, and the registry runs their plans on every engine), its token id
# (hash), the previous layer's carry (recurrent), the step and an expert pool
# (rexmoe). A router of a new kind joins this list.
DECODE_ROUTERS = ("topk", "hash", "recurrent", "rexmoe")


@pytest.mark.parametrize("router,capacity_factor",
                         [(r, None) for r in DECODE_ROUTERS] + [("topk", 1.0)])
def test_cached_decode_equals_full_forward(router, capacity_factor):
  """With MoE(decode=True), token-by-token decoding with the attention cache gives
  the logits of the full forward, for each kind of causal router
  (DECODE_ROUTERS), and with a capacity factor (the layer's decode routing has
  none, whatever the router). Without decode routing, capacity depends on the
  number of tokens per call, and the two differ."""
  assert set(DECODE_ROUTERS) <= set(CAUSAL_ROUTERS)
  cfg = TransformerConfig(router=router, capacity_factor=capacity_factor, deterministic=True)
  tokens = synthetic_tokens()
  want, got = full_and_cached_logits(cfg, tokens)
  assert got.shape == want.shape == (B, L, VOCAB)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if router == "topk" and capacity_factor is not None:
    want, got = full_and_cached_logits(cfg.replace(moe_decode=False), tokens)
    assert np.max(np.abs(np.asarray(got) - np.asarray(want))) > 1e-3


def loss_and_grads(model: TransformerLM, variables, batch):
  """((loss, MoE metrics by layer), grads) of the LM loss plus the sown MoE loss."""
  def loss_fn(params):
    logits, mutated = model.apply({**variables, "params": params}, batch,
                                  mutable=moejax.SOWN)
    aux = moejax.sown_aux(mutated)
    return cross_entropy(logits, batch) + aux.loss, aux.metrics
  return jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])


def test_sharded_and_expert_parallel_equal_one_device():
  """Parameters sharded by the model's own logical rules on its own mesh
  (fsdp, tensor and expert axes of size 2), and the experts run expert-parallel
  over its 'expert' axis with their hidden axis split over 'tensor': loss, MoE
  loads and gradients equal the same model's run without a mesh. Its abstract
  init works outside any mesh."""
  model = TransformerLM(TransformerConfig(expert_parallel=EXPERT_PARALLEL, deterministic=True))
  batch = synthetic_tokens(batch=8)
  abstract = jax.eval_shape(model.init, jax.random.key(0), batch)
  assert nn.get_partition_spec(abstract)["params"]["block_0"]["moe"]["experts"]["wi_gate"] == (
      jax.sharding.PartitionSpec("expert", "embed", "mlp"))

  @jax.jit
  def one_device(key, batch):
    variables = nn.meta.unbox(model.init(key, batch))
    return variables, loss_and_grads(model, variables, batch)

  variables, ((want_loss, want_metrics), want_grads) = one_device(jax.random.key(0), batch)
  assert "ep_device_rows" not in want_metrics["block_0/moe"]

  mesh = jax.make_mesh((1, 2, 2, 2), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh,
                                          LOGICAL_AXIS_RULES)
  assert shardings["params"]["block_0"]["moe"]["experts"]["wo"].spec == (
      jax.sharding.PartitionSpec("expert", "tensor", "fsdp"))
  batch_sharding = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec("batch", "length"),
                                               mesh, LOGICAL_AXIS_RULES)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(variables, shardings)
    (loss, metrics), grads = jax.jit(functools.partial(loss_and_grads, model))(
        sharded, jax.device_put(batch, batch_sharding))
  for i in range(2):
    layer = metrics[f"block_{i}/moe"]
    assert float(layer["ep_dropped"]) == 0
    np.testing.assert_array_equal(layer["load"], want_metrics[f"block_{i}/moe"]["load"])
    assert float(jnp.sum(layer["ep_device_rows"])) == float(jnp.sum(layer["load"]))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
  assert_trees_close(grads, want_grads, rtol=1e-5, atol=1e-5, what="sharded grads")


def test_bf16_model_keeps_bf16_residual():
  """With dtype=bfloat16 every block, and the MoE inside it, returns bfloat16; an
  MoE without a dtype follows its input's (bfloat16 or float32)."""
  model = TransformerLM(TransformerConfig(dtype=jnp.bfloat16, deterministic=True))
  tokens = synthetic_tokens()

  def forward(key, tokens):
    variables = model.init(key, tokens)
    logits, state = model.apply(
        variables, tokens, capture_intermediates=lambda m, method: (
            method == "__call__" and isinstance(m, (DecoderBlock, moejax.MoE))))
    return logits, state["intermediates"]

  logits, captured = jax.eval_shape(forward, jax.random.key(0), tokens)
  assert logits.shape == (B, L, VOCAB)
  for i in range(2):
    block = captured[f"block_{i}"]
    assert block["__call__"][0].dtype == jnp.bfloat16
    assert block["moe"]["__call__"][0].dtype == jnp.bfloat16

  layer = moejax.MoE(num_experts=4, top_k=2, hidden_dim=32, aux="sow")
  for dtype in (jnp.bfloat16, jnp.float32):
    x = jnp.ones((B, L, 16), dtype)
    y = jax.eval_shape(lambda x: layer.apply(layer.init(jax.random.key(0), x), x), x)
    assert y.dtype == dtype
