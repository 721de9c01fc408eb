"""A router in one file: a router defined and registered here alone, which reads the
preceding attention block's probabilities and a carry from the previous MoE
layer, runs on every engine, in the LM's training step and under expert
parallelism with nothing else changed; and no code outside routers/ asks a router
anything the interface (routers/base.py) does not declare."""
from __future__ import annotations

import os
import re
from typing import ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pallas_kernels
from moejax import MoE, routers
from moejax.core import RouterOutput, RoutingContext, RoutingPlan
from moejax.models import TransformerLM
from moejax.parallel import ExpertParallel, make_mesh
from moejax.train.state import TrainState
from moejax.train.step import make_train_step
from tests.helpers import assert_trees_close, jit_init

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "attention_carry_test"
B, L, D, E, K = 2, 8, 12, 4, 2


class AttentionCarryRouter(routers.Router):
  """Top-K of z = (x + A x) W_g + c W_c: A the head-averaged attention of the
  preceding block ([B, L, L], identity without one), c the previous MoE layer's
  routing probabilities (zeros at the first). Hands its probabilities on."""

  num_experts: int
  top_k: int = 2

  context_fields: ClassVar[frozenset] = frozenset({"attention", "carry"})
  loss_names: ClassVar[tuple[str, ...]] = ("z",)
  default_loss_weights: ClassVar[dict] = {"z": 1e-3}

  @nn.compact
  def __call__(self, x, ctx: Optional[RoutingContext] = None,
               deterministic: bool = True) -> RouterOutput:
    ctx = RoutingContext() if ctx is None else ctx
    batch, length, dim = x.shape
    x = x.astype(jnp.float32)
    mixed = x if ctx.attention is None else x + jnp.einsum("bqk,bkd->bqd", ctx.attention, x)
    carry = (jnp.zeros((batch * length, self.num_experts), jnp.float32) if ctx.carry is None
             else ctx.carry)
    logits = (nn.Dense(self.num_experts, use_bias=False, name="gate")(mixed.reshape(-1, dim))
              + nn.Dense(self.num_experts, use_bias=False, name="carry")(carry))
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, self.top_k)
    plan = RoutingPlan.from_topk(experts, weights).masked(
        jnp.repeat(ctx.token_mask(batch * length), self.top_k))
    return RouterOutput(
        plan=plan, logits=logits, probs=probs,
        losses={"z": jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)},
        metrics={"carry_norm": jnp.linalg.norm(carry),
                 "attention_row_sum": (jnp.float32(0.0) if ctx.attention is None else
                                       jnp.mean(jnp.sum(ctx.attention, axis=-1)))},
        carry=probs)


@pytest.fixture(scope="module", autouse=True)
def registered():
  routers.register(NAME)(AttentionCarryRouter)
  yield
  routers.unregister(NAME)


def _context(seed: int = 0) -> RoutingContext:
  keys = jax.random.split(jax.random.PRNGKey(seed), 2)
  attention = jax.nn.softmax(jax.random.normal(keys[0], (B, L, L)), axis=-1)
  carry = jax.nn.softmax(jax.random.normal(keys[1], (B * L, E)), axis=-1)
  return RoutingContext(attention=attention, carry=carry)


def _loss_and_grads(layer, variables, x, ctx):
  def loss(params, x):
    y, aux = layer.apply({"params": params}, x, ctx)
    return jnp.sum(jnp.tanh(y) * jnp.arange(D)) + aux.loss, aux
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      variables["params"], x)


ENGINES = [("einsum", "xla"), ("sorted", "xla"), ("sorted", "ragged_dot"),
           ("sorted", "pallas")]
PALLAS = pallas_kernels.KernelSettings(tiling=pallas_kernels.GmmTiling.uniform(8, 8, 8),
                                       combine_tiles=pallas_kernels.CombineTiles(8, 8, 8))


def test_one_file_router_on_every_engine():
  x = jax.random.normal(jax.random.PRNGKey(1), (B, L, D))
  ctx = _context()
  oracle = MoE(num_experts=E, top_k=K, hidden_dim=16, router=NAME, engine="loop")
  variables = jax.jit(oracle.init)(jax.random.PRNGKey(2), x, ctx)
  (want_loss, want_aux), want_grads = _loss_and_grads(oracle, variables, x, ctx)
  # The carry and the attention reached the router, and the carry's gradient flows.
  assert float(want_aux.metrics["carry_norm"]) > 0
  np.testing.assert_allclose(want_aux.metrics["attention_row_sum"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(want_aux.carry.sum(-1), 1.0, rtol=1e-6)
  assert float(jnp.max(jnp.abs(want_grads[0]["router"]["carry"]["kernel"]))) > 0
  for engine, backend in ENGINES:
    layer = MoE(num_experts=E, top_k=K, hidden_dim=16, router=NAME, engine=engine,
                backend=backend, block_size=4,
                kernel_settings=PALLAS if backend == "pallas" else None)
    (loss, _), grads = _loss_and_grads(layer, variables, x, ctx)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=f"{engine}/{backend}")
    assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-5, what=f"{engine}/{backend}")


def _model(num_layers: int = 2):
  return TransformerLM(vocab_size=32, num_layers=num_layers, model_dim=16, num_heads=2,
                       mlp_dim=32, moe=dict(num_experts=E, top_k=K, hidden_dim=16,
                                            router=NAME, block_size=8), moe_every=1)


def _batch(rows: int = 4, length: int = L):
  tokens = jax.random.randint(jax.random.PRNGKey(3), (rows, length + 1), 1, 32)
  segments = jnp.ones_like(tokens).at[0, -3:].set(0)        # padding at the end of row 0
  return {"tokens": tokens, "tokens_segment_ids": segments,
          "tokens_positions": jnp.broadcast_to(jnp.arange(length + 1), tokens.shape)}


def test_one_file_router_in_the_lm_training_step():
  """The model computes the attention probabilities for this router alone and hands
  each MoE layer the previous one's carry; a train step updates the router's
  carry weights of the second layer (the first gets zeros)."""
  model = _model()
  batch = _batch()
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch["tokens"][:, :-1])
  _, aux = model.apply(variables, batch["tokens"][:, :-1])
  assert float(aux["layer_0"].metrics["carry_norm"]) == 0.0        # the first MoE layer
  assert float(aux["layer_1"].metrics["carry_norm"]) > 0
  for name in ("layer_0", "layer_1"):
    np.testing.assert_allclose(aux[name].metrics["attention_row_sum"], 1.0, rtol=1e-5)
  params = nn.meta.unbox(variables["params"])
  tx = optax.sgd(0.1)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     routing={})
  new_state, metrics = jax.jit(make_train_step(model, tx))(state, batch, jax.random.PRNGKey(4))
  assert np.isfinite(float(metrics["loss"]))
  moved = lambda layer: float(jnp.max(jnp.abs(
      new_state.params[f"block_{layer}"]["moe"]["router"]["carry"]["kernel"]
      - params[f"block_{layer}"]["moe"]["router"]["carry"]["kernel"])))
  assert moved(0) == 0.0 and moved(1) > 0


def test_routers_receive_only_the_context_they_declare():
  """topk declares no attention: the model computes none for it, and its context
  holds no attention, carry or token ids."""
  seen = {}

  class Probe(routers.Router):
    num_experts: int
    top_k: int = 2
    context_fields: ClassVar[frozenset] = frozenset({"token_ids"})

    @nn.compact
    def __call__(self, x, ctx=None, deterministic=True):
      seen.update(attention=ctx.attention, carry=ctx.carry, token_ids=ctx.token_ids,
                  segment_ids=ctx.segment_ids)
      logits = nn.Dense(self.num_experts, use_bias=False)(x.reshape(-1, x.shape[-1]))
      probs = jax.nn.softmax(logits)
      weights, experts = jax.lax.top_k(probs, self.top_k)
      return RouterOutput(plan=RoutingPlan.from_topk(experts, weights), logits=logits,
                          probs=probs)

  routers.register("probe_test")(Probe)
  try:
    model = TransformerLM(vocab_size=32, num_layers=1, model_dim=16, num_heads=2, mlp_dim=32,
                          moe=dict(num_experts=E, top_k=K, hidden_dim=16, router="probe_test"))
    batch = _batch()
    jit_init(model, jax.random.PRNGKey(0), batch["tokens"][:, :-1],
             segment_ids=batch["tokens_segment_ids"][:, :-1])
  finally:
    routers.unregister("probe_test")
  assert seen["attention"] is None and seen["carry"] is None
  assert seen["token_ids"] is not None and seen["segment_ids"] is not None


@pytest.mark.parametrize("shape", [(2, 4, 1), (1, 8, 1)])
def test_one_file_router_under_expert_parallelism(shape):
  x = jax.random.normal(jax.random.PRNGKey(5), (4, L, D))
  keys = jax.random.split(jax.random.PRNGKey(6), 2)
  ctx = RoutingContext(attention=jax.nn.softmax(jax.random.normal(keys[0], (4, L, L)), -1),
                       carry=jax.nn.softmax(jax.random.normal(keys[1], (4 * L, 8)), -1))
  reference = MoE(num_experts=8, top_k=K, hidden_dim=16, router=NAME, block_size=8)
  variables = jax.jit(reference.init)(jax.random.PRNGKey(7), x, ctx)
  (want, _), want_grads = _loss_and_grads(reference, variables, x, ctx)
  layer = reference.clone(expert_parallel=ExpertParallel())
  with jax.set_mesh(make_mesh(*shape)):
    (got, aux), grads = _loss_and_grads(layer, variables, x, ctx)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-5, what=str(shape))
  assert float(aux.metrics["ep_dropped"]) == 0


def test_a_class_that_is_not_a_router_cannot_register():
  class NotARouter(nn.Module):
    num_experts: int
    top_k: int = 2

  with pytest.raises(TypeError, match="must subclass moejax.routers.Router"):
    routers.register("not_a_router")(NotARouter)
  assert "not_a_router" not in routers.names()

  class BadField(routers.Router):
    num_experts: int
    top_k: int = 2
    context_fields: ClassVar[frozenset] = frozenset({"future_tokens"})

  with pytest.raises(TypeError, match=r"context_fields has \['future_tokens'\]"):
    routers.register("bad_field")(BadField)


def _package_files(exclude: tuple[str, ...], tops: tuple[str, ...] = ("moejax",)) -> list[str]:
  paths = []
  for top in tops:
    for root, _, files in os.walk(os.path.join(REPO, top)):
      for name in files:
        path = os.path.join(root, name)
        relative = os.path.relpath(path, REPO)
        if name.endswith(".py") and not relative.startswith(exclude):
          paths.append(path)
  return sorted(paths)


def test_no_router_knowledge_outside_routers():
  """Outside routers/ (and configs/), no getattr on a router, no comparison with a
  router's name: only the declared interface."""
  getattr_router = re.compile(r"getattr\([^)]*router")
  names = "|".join(re.escape(n) for n in routers.names())
  quoted = rf"[\"']({names})[\"']"
  name_test = re.compile(rf"(==|!=)\s*{quoted}|\bin\s*[(\[{{][^)\]}}]*{quoted}")
  found = []
  package = _package_files(exclude=(os.path.join("moejax", "routers"),))
  for path in _package_files(exclude=(os.path.join("moejax", "routers"),),
                             tops=("moejax", "pallas_kernels", "experiments", "tests")):
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        if getattr_router.search(line) or (path in package and name_test.search(line)):
          found.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()}")
  assert not found, found
