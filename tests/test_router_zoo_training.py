"""Router zoo I inside the train step and the configs: THOR's consistency loss,
ReMoE's adaptive L1 coefficient, loss-weight defaults, start-up errors, and the
README's router table."""
from __future__ import annotations

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax import routers
from moejax.models import TransformerLM
from moejax.routers import consistency_loss
from moejax.train import setup
from moejax.train.state import TrainState
from moejax.train.step import make_train_step, split_batch
from tests.helpers import jit_init

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lm(router, top_k=2, **router_kwargs):
  return TransformerLM(vocab_size=32, num_layers=1, model_dim=16, num_heads=2, mlp_dim=32,
                       moe={"num_experts": 4, "top_k": top_k, "hidden_dim": 16,
                            "block_size": 8, "router": router,
                            "router_kwargs": router_kwargs})


def _batch(rows=4, length=9):
  tokens = np.random.default_rng(0).integers(0, 32, size=(rows, length))
  return {"tokens": jnp.asarray(tokens, jnp.int32),
          "tokens_segment_ids": jnp.ones((rows, length), jnp.int32),
          "tokens_positions": jnp.broadcast_to(jnp.arange(length), (rows, length))}


def _state(model, tx, batch):
  variables = jit_init(model, {"params": jax.random.key(0), "router": jax.random.key(1)},
                       batch["tokens"][:, :-1], deterministic=False)
  params = nn.meta.unbox(variables["params"])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    routing=variables.get("routing", {}))


def test_random_routing_consistency_loss_in_the_train_step():
  """With consistency_weight a, the step's loss is the mean CE of two passes with
  independent routing plus a times their symmetric KL, as computed here by hand."""
  weight = 0.7
  model, tx, batch = _lm("random", consistency_weight=weight), optax.sgd(0.0), _batch()
  assert model.step_needs.consistency_weight == weight
  state = _state(model, tx, batch)
  rng = jax.random.key(3)
  new_state, metrics = jax.jit(make_train_step(model, tx))(state, batch, rng)
  rows = split_batch(batch)
  step_rng = jax.random.fold_in(rng, 0)            # micro-batch 0's key

  def logits(key):
    return model.apply({"params": state.params}, rows["inputs"], rows["positions"],
                       rows["segments"], deterministic=False, rngs={"router": key})[0]
  a, b = logits(step_rng), logits(jax.random.fold_in(step_rng, 1))
  ce = lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, rows["targets"])
  want_ce = float(jnp.mean(0.5 * (ce(a) + ce(b))))
  want_kl = float(consistency_loss(a, b, rows["mask"]))
  assert want_kl > 1e-6                              # the two passes route differently
  np.testing.assert_allclose(metrics["loss"], want_ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["consistency"], want_kl, rtol=1e-4)
  # Without the weight, one pass and no consistency metric.
  _, plain = jax.jit(make_train_step(_lm("random"), tx))(state, batch, rng)
  assert "consistency" not in plain


def test_relu_l1_coefficient_moves_after_each_step():
  # At initialisation about half the ReLU gates are open: sparsity ~0.5 < 0.9,
  # so lambda grows by the rate after the step (and shrinks with a target of 0.1).
  batch, tx = _batch(), optax.sgd(1e-3)
  for target, factor in ((0.9, 2.0), (0.1, 0.5)):
    model = _lm("relu", top_k=4, target_sparsity=target, sparsity_rate=2.0, l1_init=0.01)
    state = _state(model, tx, batch)
    new_state, metrics = jax.jit(make_train_step(model, tx))(state, batch, jax.random.key(0))
    sparsity = float(metrics["layers"]["layer_0"]["token_sparsity"])
    assert 0.1 < sparsity < 0.9
    routing = new_state.routing["block_0"]["moe"]["router"]
    np.testing.assert_allclose(routing["l1_coef"], 0.01 * factor, rtol=1e-6)
    np.testing.assert_array_equal(routing["counts"], 0.0)


def _zoo(router):
  return setup.config_from_file(os.path.join(REPO, "configs", f"router_zoo.py:{router}"))


@pytest.mark.parametrize("router", routers.names())
def test_router_zoo_configs_validate(router):
  config = _zoo(router)
  setup.check(config, num_devices=1)
  assert setup.moe_settings(config)["router"] == router


def test_unset_loss_weights_take_the_router_defaults():
  weights = lambda config: setup.build_model(config).moe.resolved_loss_weights
  config = _zoo("relu")
  assert weights(config) == {"sparsity": 1.0, "switch": 1e-2}
  config.moe.loss_weights.switch = 0.0
  config.moe.loss_weights.tsallis = 0.5
  assert weights(config) == {"sparsity": 1.0, "tsallis": 0.5}     # weight 0: not computed
  # The table is shared by all routers: a zero weight for a loss this router lacks is
  # ignored, a positive one is an error naming the field.
  config = _zoo("hash")
  config.moe.loss_weights.switch = 0.0
  assert weights(config) == {}
  config.moe.loss_weights.switch = 0.01
  with pytest.raises(ValueError, match=r"^moe\.loss_weights\.switch .*'hash'"):
    setup.check(config, num_devices=1)


def test_noncausal_router_in_the_lm_fails_at_start_up_naming_the_field():
  config = setup.config_from_file(os.path.join(REPO, "configs", "lm_tiny.py"))
  config.moe.router = "expert_choice"
  with pytest.raises(ValueError, match=r"^moe\.expert_choice\.allow_noncausal is False"):
    setup.check(config, num_devices=1)
  config.moe.expert_choice.allow_noncausal = True
  setup.check(config, num_devices=1)


def test_readme_router_table_lists_every_router():
  text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  table = text.split("## Routers", 1)[1].split("\n\n", 2)[1]
  listed = re.findall(r"^\| `([a-z_]+)` \|", table, re.M)
  assert sorted(listed) == routers.names()
