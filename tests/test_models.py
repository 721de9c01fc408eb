"""The transformer LM: causality, masking, MoE placement, dtypes and annotations."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.models import CausalSelfAttention, TransformerLM
from moejax.models.attention import rotary

MOE = {"num_experts": 4, "top_k": 2, "hidden_dim": 16, "block_size": 8}


def _model(**overrides):
  kwargs = dict(vocab_size=50, num_layers=3, model_dim=16, num_heads=2, mlp_dim=32,
                moe=MOE, moe_every=2)
  kwargs.update(overrides)
  return TransformerLM(**kwargs)


def test_moe_every_places_moe_blocks_and_returns_their_aux():
  model = _model(num_layers=4, moe_every=2)
  tokens = jnp.ones((2, 8), jnp.int32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
  params = variables["params"]
  assert "moe" in params["block_1"] and "moe" in params["block_3"]
  assert "ffn" in params["block_0"] and "ffn" in params["block_2"]
  logits, aux = jax.jit(model.apply)(variables, tokens)
  assert logits.shape == (2, 8, 50) and logits.dtype == jnp.float32
  assert sorted(aux) == ["layer_1", "layer_3"]
  assert aux["layer_1"].plan.num_slots == 2 * 8 * 2
  dense, dense_aux = jax.jit(_model(moe=None).apply)(
      jax.jit(_model(moe=None).init)(jax.random.PRNGKey(0), tokens), tokens)
  assert dense_aux == {}


def test_lm_is_causal():
  """Changing tokens after position t leaves the logits up to t unchanged."""
  model = _model()
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 50, (2, 12)), jnp.int32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)
  apply = jax.jit(model.apply)
  logits, _ = apply(variables, tokens)
  for t in (0, 5, 10):
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % 50)
    other, _ = apply(variables, changed)
    np.testing.assert_allclose(other[:, :t + 1], logits[:, :t + 1], rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(other[:, t + 1:] - logits[:, t + 1:]))) > 1e-4


def test_segments_do_not_see_each_other():
  """In a packed row, the second document's logits equal those of it alone."""
  model = _model(moe=None)
  rng = np.random.default_rng(1)
  doc = jnp.asarray(rng.integers(0, 50, (1, 6)), jnp.int32)
  prefix = jnp.asarray(rng.integers(0, 50, (1, 5)), jnp.int32)
  packed = jnp.concatenate([prefix, doc], axis=1)
  segments = jnp.array([[1] * 5 + [2] * 6])
  positions = jnp.array([list(range(5)) + list(range(6))])
  variables = jax.jit(model.init)(jax.random.PRNGKey(2), packed)
  alone, _ = jax.jit(model.apply)(variables, doc)
  together, _ = jax.jit(model.apply)(variables, packed, positions, segments)
  np.testing.assert_allclose(together[:, 5:], alone, rtol=1e-5, atol=1e-5)


def test_attention_probabilities_are_causal_distributions():
  attention = CausalSelfAttention(num_heads=2, head_dim=4)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 8))
  positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
  variables = attention.init(jax.random.PRNGKey(4), x, positions)
  y, probs = attention.apply(variables, x, positions, return_probs=True)
  assert y.shape == x.shape and probs.shape == (2, 5, 5)
  np.testing.assert_allclose(jnp.sum(probs, axis=-1), 1.0, rtol=1e-6)
  assert float(jnp.max(jnp.abs(jnp.triu(probs, k=1)))) == 0.0


def test_rotary_preserves_norms_and_depends_on_relative_position():
  x = jax.random.normal(jax.random.PRNGKey(5), (1, 4, 1, 8))
  positions = jnp.arange(4)[None]
  rotated = rotary(x, positions)
  np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1),
                             rtol=1e-5)
  q, k = jnp.ones((1, 1, 1, 8)), jnp.ones((1, 1, 1, 8)) * 0.5
  dot = lambda a, b: float(jnp.sum(rotary(q, jnp.array([[a]])) * rotary(k, jnp.array([[b]]))))
  assert dot(3, 1) == pytest.approx(dot(7, 5), rel=1e-5)     # both 2 apart


def test_bfloat16_activations_keep_router_and_logits_float32():
  model = _model(dtype=jnp.bfloat16)
  tokens = jnp.ones((1, 6), jnp.int32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(6), tokens)
  logits, aux = jax.jit(model.apply)(variables, tokens)
  assert logits.dtype == jnp.float32
  assert aux["layer_1"].plan.weight.dtype == jnp.float32
  params = jax.tree_util.tree_leaves(nn.meta.unbox(variables["params"]))
  assert all(p.dtype == jnp.float32 for p in params)


def test_every_parameter_has_logical_axes():
  variables = jax.jit(_model().init)(jax.random.PRNGKey(7), jnp.ones((1, 4), jnp.int32))
  boxes = jax.tree_util.tree_leaves(variables["params"],
                                    is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
  embed = variables["params"]["embed"]["embedding"]
  assert embed.names == ("vocab", "embed")


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_layers=0), "model.num_layers"),
    (dict(num_heads=3), "model.num_heads"),
    (dict(model_dim=18, num_heads=2, head_dim=9), "model.head_dim"),
    (dict(moe_every=0), "model.moe_every"),
    (dict(moe={**MOE, "top_k": 9}), "top_k"),
])
def test_bad_model_settings_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    _model(**kwargs)


def test_a_bidirectional_model_takes_expert_choice_and_a_capacity_per_layer():
  """causal=False: attention sees later tokens, expert choice is allowed, and the
  capacity each MoE layer's router reads comes from the call."""
  from moejax.models import TransformerLM  # pylint: disable=g-import-not-at-top
  moe = dict(num_experts=4, top_k=1, hidden_dim=16, router="expert_choice",
             router_kwargs={"max_capacity": 8})
  with pytest.raises(ValueError, match="causal"):
    TransformerLM(vocab_size=16, num_layers=2, model_dim=8, num_heads=2, mlp_dim=16, moe=moe)
  model = TransformerLM(vocab_size=16, num_layers=2, model_dim=8, num_heads=2, mlp_dim=16,
                        moe=moe, causal=False)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 16)
  variables = model.init(jax.random.PRNGKey(1), tokens)
  logits, aux = model.apply(variables, tokens)
  later = tokens.at[:, -1].set((tokens[:, -1] + 1) % 16)
  first = model.apply(variables, later)[0][:, 0]
  assert float(jnp.max(jnp.abs(first - logits[:, 0]))) > 0        # sees the future
  # T = 16, E = 4: capacity 2 in layer 0 and 8 in layer 1 -> 8 and 32 slots.
  _, aux = model.apply(variables, tokens, capacity={"layer_0": 2, "layer_1": 8})
  assert int(aux["layer_0"].plan.valid.sum()) == 8
  assert int(aux["layer_1"].plan.valid.sum()) == 32
