"""Sampling from the LM (moejax.models.generate): cached decoding equals the full
forward, greedy decoding equals an argmax loop over full forwards, for routers that
route alone (topk), across layers (recurrent) and by earlier tokens (similarity),
with the intervention bias passed through, and the argument checks."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.models import TransformerLM, generate

V, P, N, B = 32, 8, 4, 2


def _model(router="topk", **overrides):
  """The tiny LM; the loop engine (the oracle) compiles quickest."""
  moe = dict(num_experts=4, top_k=2, hidden_dim=32, router=router, engine="loop")
  kwargs = dict(vocab_size=V, num_layers=2, model_dim=32, num_heads=4, mlp_dim=32, moe=moe)
  kwargs.update(overrides)
  return TransformerLM(**kwargs)


@pytest.fixture(scope="module")
def lms():
  """({router: (model, variables)} for topk, recurrent and similarity routing,
  tokens int32[B, P + N]). topk's variables hold a zero `logit_bias` collection
  (the intervention bias at rest)."""
  tokens = jax.random.randint(jax.random.key(0), (B, P + N), 0, V, jnp.int32)
  models = {router: _model(router) for router in ("topk", "recurrent", "similarity")}
  keys = dict(zip(models, jax.random.split(jax.random.key(1), len(models))))
  variables = jax.jit(lambda keys: {router: model.init(keys[router], tokens)
                                    for router, model in models.items()})(keys)
  out = {router: (model, variables[router]) for router, model in models.items()}
  model, plain = out["topk"]
  zeros = jax.eval_shape(
      lambda v: model.apply(v, tokens, mutable=["logit_bias"])[1]["logit_bias"], plain)
  out["topk"] = model, {**plain, "logit_bias": jax.tree_util.tree_map(
      lambda s: jnp.zeros(s.shape, s.dtype), zeros)}
  return out, tokens


def _with_bias(variables, bias):
  """variables with `bias` on expert 0 of every router in the `logit_bias` collection."""
  return {**variables, "logit_bias": jax.tree_util.tree_map(
      lambda delta: delta.at[0].set(bias), variables["logit_bias"])}


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, variables, tokens):
  return model.apply(variables, tokens)


@functools.partial(jax.jit, static_argnums=0)
def _cached_logits(model, variables, tokens):
  """Logits float32[B, L, V] and the final cache index: a decode prefill of
  tokens[:, :P] into a zero cache of length L, then one cached step per later
  token."""
  batch, length = tokens.shape

  def positions(start, n):
    return jnp.broadcast_to(start + jnp.arange(n), (batch, n))

  def call(cache, chunk, start):
    (logits, _), updated = model.apply({**variables, "cache": cache}, chunk,
                                       positions(start, chunk.shape[1]), decode=True,
                                       mutable=["cache"])
    return logits, updated["cache"]

  def step(cache, t):
    logits, cache = call(cache, jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1), t)
    return cache, logits[:, 0]

  shapes = jax.eval_shape(lambda: model.apply(
      variables, tokens, positions(0, length), decode=True, mutable=["cache"])[1]["cache"])
  cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  prefill, cache = call(cache, tokens[:, :P], 0)
  cache, steps = jax.lax.scan(step, cache, jnp.arange(P, length))
  logits = jnp.concatenate([prefill, steps.transpose(1, 0, 2)], axis=1)
  return logits, cache["block_1"]["attention"]["cache_index"]


def _argmax_loop(model, variables, prompt, steps):
  """The reference: each new token is the argmax of the logits at the last token of
  a full forward of the sequence so far, padded to P + N with filler tokens other
  than generate's (the model is causal; one compiled shape)."""
  tokens = np.asarray(prompt)
  filler = (np.arange(P + steps) * 7 + 3) % V
  for _ in range(steps):
    length = tokens.shape[1]
    padded = np.concatenate([tokens, np.broadcast_to(filler[length:], (B, P + steps - length))],
                            axis=1)
    logits, _ = _forward(model, variables, jnp.asarray(padded))
    tokens = np.concatenate([tokens, np.argmax(logits[:, length - 1], axis=-1)[:, None]],
                            axis=1)
  return tokens


@pytest.mark.parametrize("router", ["topk", "recurrent"])
def test_cached_decoding_equals_the_full_forward(lms, router):
  """The recurrent router's carry crosses layers within a token, so it decodes too."""
  models, tokens = lms
  model, variables = models[router]
  full, _ = _forward(model, variables, tokens)
  cached, index = _cached_logits(model, variables, tokens)
  np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)
  assert int(index) == P + N


@pytest.mark.parametrize("bias", [0.0, 30.0])
def test_greedy_generate_equals_the_argmax_loop_under_the_logit_bias(lms, bias):
  """The `logit_bias` collection reaches every call: at +30 on expert 0 every token
  routes to expert 0 (at 0 not every one does), and generate still gives the argmax
  loop's tokens under the same bias."""
  models, tokens = lms
  model, variables = models["topk"]
  variables = _with_bias(variables, bias)
  out = generate(model, variables, tokens[:, :P], N)
  assert out.shape == (B, P + N) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out, _argmax_loop(model, variables, tokens[:, :P], N))
  _, aux = _forward(model, variables, out)
  for layer in ("layer_0", "layer_1"):
    has_expert_0 = jnp.any(aux[layer].plan.expert.reshape(B * (P + N), 2) == 0, axis=-1)
    assert bool(jnp.all(has_expert_0)) == (bias > 0)


def test_a_router_reading_earlier_tokens_recomputes(lms):
  """similarity routes by earlier tokens: no cache; the full forward on the padded
  buffer gives the argmax loop's tokens."""
  models, tokens = lms
  model, variables = models["similarity"]
  out = generate(model, variables, tokens[:, :P], N)
  np.testing.assert_array_equal(out, _argmax_loop(model, variables, tokens[:, :P], N))
  with pytest.raises(ValueError, match="use_cache"):
    generate(model, variables, tokens[:, :P], N, use_cache=True)


def test_sampling_is_reproducible_and_in_range(lms):
  """Temperature 1.5: the same rng gives the same tokens, in [0, V), and not the
  greedy ones."""
  models, tokens = lms
  model, variables = models["topk"]
  prompt = tokens[:, :P]
  first = generate(model, variables, prompt, N, temperature=1.5, rng=jax.random.key(7))
  again = generate(model, variables, prompt, N, temperature=1.5, rng=jax.random.key(7))
  np.testing.assert_array_equal(first, again)
  np.testing.assert_array_equal(first[:, :P], prompt)
  assert int(jnp.min(first)) >= 0 and int(jnp.max(first)) < V
  assert not np.array_equal(first, generate(model, variables, prompt, N))
  with pytest.raises(ValueError, match="rng"):
    generate(model, variables, prompt, N, temperature=1.0)


@pytest.mark.parametrize("change,field", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(prompt=jnp.zeros((P,), jnp.int32)), "prompt"),
    (dict(prompt=jnp.zeros((B, P), jnp.float32)), "prompt"),
    (dict(temperature=-1.0), "temperature"),
    (dict(model=_model(causal=False)), "model.causal"),
])
def test_bad_arguments_name_themselves(lms, change, field):
  models, tokens = lms
  model, variables = models["topk"]
  args = dict(model=model, variables=variables, prompt=tokens[:, :P], max_new_tokens=N)
  args.update(change)
  with pytest.raises(ValueError, match=field):
    generate(args.pop("model"), args.pop("variables"), args.pop("prompt"),
             args.pop("max_new_tokens"), **args)
