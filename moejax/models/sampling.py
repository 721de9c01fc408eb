"""Sampling from a causal TransformerLM, with a KV cache.

  generate(model, variables, prompt int[B, P], N) -> tokens int32[B, P + N]

The first P tokens of each row are the prompt; token P + t is drawn from the
model's logits at position P + t - 1: the argmax at temperature 0, else a sample of
softmax(logits / temperature). All rows have the same prompt length P (no padding).

Two ways to compute the logits, each one jit-compiled program per model and shapes
(the temperature is traced: greedy and sampled decoding share it), with its steps
inside a lax.fori_loop:

  cache      the attention keys and values live in the `cache` collection
             (models/attention.py, zeros of length P + N made from the model's
             shapes alone); one prefill call on the prompt [B, P], then one call on
             [B, 1] per later new token. Cost: the projections and FFNs of one
             forward of length P + N; each new token attends over all P + N
             cached positions (masked), O((P + N)^2) per row in all.
  recompute  a fixed buffer [B, P + N] holding the prompt and the tokens drawn so
             far (zeros after them); one full forward per new token, whose logits at
             position P + t - 1 depend on tokens <= P + t - 1 only, the model being
             causal. Cost: N forwards of length P + N.

The cache is the default; a router that reads the earlier tokens of the sequence
to route a token (its reads_earlier_tokens, routers/base.py: similarity,
attention_aware) cannot route one new token alone, so it recomputes. Both ways
route as MoE decode does, without capacity (the recompute way runs the model with
moe.capacity_factor None), so a token's routing never depends on the tokens after
it or on the buffer's padding.

`variables` are those of model.apply (params, and routing, logit_bias, ... when the
model has them); every collection but `cache` is passed to every call unchanged and
read-only, so an intervention bias (`logit_bias`) steers the routing of every
generated token.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from jax import lax

from moejax import validation
from moejax.models.transformer import TransformerLM

Array = jax.Array

CACHE = "cache"


def generate(model: TransformerLM, variables: Mapping[str, Any], prompt: Array,
             max_new_tokens: int, *, temperature: float = 0.0,
             rng: Optional[Array] = None, use_cache: Optional[bool] = None,
             step: Optional[int] = None) -> Array:
  """Continues each row of `prompt` by `max_new_tokens` tokens. See the module
  docstring.

  Args:
    model: a causal TransformerLM (model.causal True).
    variables: the collections model.apply takes; a `cache` among them is ignored.
    prompt: int[B, P], P >= 1, equal-length rows without padding.
    max_new_tokens: N >= 1.
    temperature: 0 for greedy argmax decoding; > 0 to sample softmax(logits / T).
    rng: a jax.random key, required when temperature > 0 (split into one key
      per new token); unused at temperature 0.
    use_cache: None: the KV cache unless the router reads earlier tokens
      (reads_earlier_tokens), then recompute; True: the cache (refused for such a
      router); False: recompute.
    step: the training step the routers see (RoutingContext.step: schedules such
      as ReXMoE's candidates); None as at model.apply's default.

  Returns:
    int32[B, P + N]: the prompt followed by the N new tokens.

  Raises:
    ValueError: a non-causal model or a bad argument; the message names it.
  """
  prompt = jnp.asarray(prompt)
  cached = _check(model, prompt, max_new_tokens, temperature, rng, use_cache)
  keys = jax.random.split(jax.random.key(0) if rng is None else rng, max_new_tokens)
  variables = {name: value for name, value in variables.items() if name != CACHE}
  prompt = prompt.astype(jnp.int32)
  temperature = jnp.float32(temperature)
  step = None if step is None else jnp.int32(step)
  if cached:
    return _cached(model, variables, prompt, max_new_tokens, temperature, keys, step)
  return _recomputed(_without_capacity(model), variables, prompt, max_new_tokens,
                     temperature, keys, step)


def _check(model: TransformerLM, prompt: Array, max_new_tokens: Any, temperature: Any,
           rng: Optional[Array], use_cache: Optional[bool]) -> bool:
  """Validates the arguments -> whether to decode with the cache."""
  if not model.causal:
    raise ValueError("generate needs a causal model (model.causal is False): a "
                     "bidirectional model's logits at a position read later tokens")
  validation.positive_int("max_new_tokens", max_new_tokens)
  validation.in_range("temperature", temperature, 0.0, math.inf)
  if temperature > 0 and rng is None:
    raise ValueError(f"rng is None, but temperature is {temperature}: sampling needs a "
                     "jax.random key")
  if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer) or not prompt.size:
    raise ValueError(f"prompt must be int[B, P] with B, P >= 1, got "
                     f"{prompt.dtype}{list(prompt.shape)}")
  validation.one_of("use_cache", use_cache, (None, False, True))
  reads = model.moe is not None and model.moe.router_spec.reads_earlier_tokens
  if use_cache and reads:
    raise ValueError(f"use_cache is True, but router {model.moe.router!r} routes each "
                     "token by the earlier tokens of its sequence, which cached decoding "
                     "does not see; use use_cache=None or False")
  return not reads if use_cache is None else use_cache


def _without_capacity(model: TransformerLM) -> TransformerLM:
  """The model with its MoE layers' capacity off, as MoE decode routes."""
  if model.moe is None or model.moe.capacity_factor is None:
    return model
  return model.clone(moe=model.moe.clone(capacity_factor=None))


def _pick(logits: Array, temperature: Array, key: Array) -> Array:
  """logits float32[B, V] -> int32[B]: the argmax at temperature 0, else a sample
  of softmax(logits / temperature)."""
  sampled = jax.random.categorical(key, logits / jnp.where(temperature > 0, temperature, 1.0),
                                   axis=-1)
  return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def _buffer(prompt: Array, max_new_tokens: int) -> Array:
  """int32[B, P + N]: the prompt, then zeros."""
  batch, length = prompt.shape
  return jnp.zeros((batch, length + max_new_tokens), jnp.int32).at[:, :length].set(prompt)


def _write(tokens: Array, token: Array, position: Any) -> Array:
  """tokens int32[B, L] with column `position` set to token int32[B]."""
  return lax.dynamic_update_slice(tokens, token[:, None], (0, position))


def _positions(batch: int, start: Any, length: int) -> Array:
  """int32[B, L]: start + arange(L) in every row."""
  return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))


def _decode_call(model: TransformerLM, variables: Mapping[str, Any], cache: Any,
                 tokens: Array, start: Any, step: Optional[Array]) -> tuple[Array, Any]:
  """Feeds tokens int32[B, n] at positions [start, start + n) through the cache ->
  (logits float32[B, n, V], the updated cache)."""
  positions = _positions(tokens.shape[0], start, tokens.shape[1])
  (logits, _), updated = model.apply({**variables, CACHE: cache}, tokens, positions,
                                     decode=True, step=step, mutable=[CACHE])
  return logits, updated[CACHE]


def _empty_cache(model: TransformerLM, variables: Mapping[str, Any], batch: int,
                 length: int) -> Any:
  """The `cache` collection for rows of `length` tokens: zeros, index 0, from the
  shapes of a decode call that creates it (nothing is computed)."""
  def create(variables):
    tokens = jnp.zeros((batch, length), jnp.int32)
    return model.apply(variables, tokens, _positions(batch, 0, length), decode=True,
                       mutable=[CACHE])[1][CACHE]

  shapes = jax.eval_shape(create, variables)
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _cached(model: TransformerLM, variables: Mapping[str, Any], prompt: Array,
            max_new_tokens: int, temperature: Array, keys: Array,
            step: Optional[Array]) -> Array:
  """Prefill of the prompt [B, P], then one cached step per new token."""
  batch, length = prompt.shape
  cache = _empty_cache(model, variables, batch, length + max_new_tokens)
  logits, cache = _decode_call(model, variables, cache, prompt, 0, step)
  tokens = _write(_buffer(prompt, max_new_tokens),
                  _pick(logits[:, -1], temperature, keys[0]), length)

  def one(t, state):
    tokens, cache = state
    last = length + t - 1
    logits, cache = _decode_call(model, variables, cache,
                                 lax.dynamic_slice_in_dim(tokens, last, 1, axis=1), last,
                                 step)
    return _write(tokens, _pick(logits[:, 0], temperature, keys[t]), last + 1), cache

  return lax.fori_loop(1, max_new_tokens, one, (tokens, cache))[0]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _recomputed(model: TransformerLM, variables: Mapping[str, Any], prompt: Array,
                max_new_tokens: int, temperature: Array, keys: Array,
                step: Optional[Array]) -> Array:
  """One full forward of the buffer [B, P + N] per new token."""
  length = prompt.shape[1]

  def one(t, tokens):
    logits, _ = model.apply(variables, tokens, step=step)
    last = lax.dynamic_index_in_dim(logits, length + t - 1, axis=1, keepdims=False)
    return _write(tokens, _pick(last, temperature, keys[t]), length + t)

  return lax.fori_loop(0, max_new_tokens, one, _buffer(prompt, max_new_tokens))
