"""Routers that do not learn: hash routing and random routing.

Both score every (token, expert) pair with a pseudo-random number u_te in [0, 1)
and take the K experts with the largest scores (K distinct experts, each expert
equally likely), with weights 1/K. They differ in what u depends on:

  hash    Hash layers (Roller et al. 2021, "Hash Layers For Large Sparse
          Models"): u_te = h(token id, e, layer, seed), a fixed integer hash, so
          a token id goes to the same experts in every batch, position and step
          (each layer with its own hash). Needs RoutingContext.token_ids.
  random  THOR (Zuo et al. 2021, "Taming Sparsely Activated Transformer with
          Stochastic Experts"): u ~ U[0, 1) drawn afresh from the `router` rng
          stream in training; with deterministic=True, drawn from the fixed key
          (seed, layer), so evaluation is reproducible.

THOR trains with two forward passes, each with its own random routing, and adds
a consistency loss between their predictions (`consistency_loss`, symmetric KL);
the train step does so when `consistency_weight` > 0. THOR reports that learned
gates did no better than random routing: random is the control of a comparison.

Neither router has parameters or losses; both are causal. probs is the plan's
own distribution (1/K on the chosen experts).
"""
from __future__ import annotations

import math
from typing import ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import validation
from moejax.core import RouterOutput, RoutingContext, RoutingPlan
from moejax.routers.base import check_experts, flatten_tokens
from moejax.routers.registry import register

Array = jax.Array


def hash_uint32(x: Array) -> Array:
  """A 32-bit integer mixing function (lowbias32): uint32 -> uint32, bijective."""
  x = x.astype(jnp.uint32)
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def hash_scores(token_ids: Array, num_experts: int, seed: int, layer: int = 0) -> Array:
  """u [T, E] in [0, 1): a hash of (token id, expert, layer, seed) alone."""
  ids = token_ids.reshape(-1).astype(jnp.uint32)
  experts = jnp.arange(num_experts, dtype=jnp.uint32)
  salt = hash_uint32(jnp.uint32(seed) * jnp.uint32(0x9E3779B9) + jnp.uint32(layer))
  key = hash_uint32(hash_uint32(ids[:, None] ^ salt) + experts[None, :])
  return (key >> 8).astype(jnp.float32) / float(1 << 24)


def uniform_plan(scores: Array, top_k: int) -> tuple[RoutingPlan, Array]:
  """Plan of the top-K scores [T, E] with weights 1/K, and its probs [T, E]."""
  _, expert_index = jax.lax.top_k(scores, top_k)
  weights = jnp.full(expert_index.shape, 1.0 / top_k, jnp.float32)
  probs = jnp.sum(jax.nn.one_hot(expert_index, scores.shape[-1]), axis=1) / top_k
  return RoutingPlan.from_topk(expert_index, weights), probs


def consistency_loss(logits_a: Array, logits_b: Array, mask: Optional[Array] = None) -> Array:
  """THOR's consistency term: mean over (masked) positions of
  (KL(p_a || p_b) + KL(p_b || p_a)) / 2 for logits [..., V]."""
  log_a = jax.nn.log_softmax(logits_a.astype(jnp.float32), axis=-1)
  log_b = jax.nn.log_softmax(logits_b.astype(jnp.float32), axis=-1)
  sym = 0.5 * jnp.sum((jnp.exp(log_a) - jnp.exp(log_b)) * (log_a - log_b), axis=-1)
  if mask is None:
    return jnp.mean(sym)
  mask = mask.astype(jnp.float32)
  return jnp.sum(sym * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class _UniformRouter(nn.Module):
  num_experts: int
  top_k: int = 2
  seed: int = 0

  loss_names: ClassVar[tuple[str, ...]] = ()
  default_loss_weights: ClassVar[dict[str, float]] = {}

  def __post_init__(self):
    check_experts(self.num_experts, self.top_k, self.num_experts)
    validation.positive_int("seed", self.seed, minimum=0)
    super().__post_init__()

  def _output(self, scores: Array) -> RouterOutput:
    plan, probs = uniform_plan(scores, self.top_k)
    return RouterOutput(plan=plan, logits=jnp.zeros_like(scores), probs=probs)


@register("hash")
class HashRouter(_UniformRouter):
  """Token id -> K fixed experts by an integer hash. See the module docstring."""

  def __call__(self, x: Array, ctx: Optional[RoutingContext] = None,
               deterministic: bool = True) -> RouterOutput:
    del deterministic
    if ctx is None or ctx.token_ids is None:
      raise ValueError("router 'hash' needs RoutingContext.token_ids (the input token ids)")
    tokens, _ = flatten_tokens(x)
    if ctx.token_ids.size != tokens.shape[0]:
      raise ValueError(f"RoutingContext.token_ids has {ctx.token_ids.size} ids for "
                       f"{tokens.shape[0]} tokens")
    layer = 0 if ctx.layer is None else ctx.layer
    return self._output(hash_scores(ctx.token_ids, self.num_experts, self.seed, layer))


@register("random")
class RandomRouter(_UniformRouter):
  """K experts uniformly at random per token (THOR). See the module docstring.

  Attributes:
    consistency_weight: weight of THOR's consistency loss between two forward
      passes; the train step runs the second pass when it is positive.
  """

  consistency_weight: float = 0.0
  uses_rng: ClassVar[bool] = True

  def __post_init__(self):
    validation.in_range("consistency_weight", self.consistency_weight, 0, math.inf)
    super().__post_init__()

  def __call__(self, x: Array, ctx: Optional[RoutingContext] = None,
               deterministic: bool = True) -> RouterOutput:
    tokens, _ = flatten_tokens(x)
    if deterministic:
      layer = 0 if ctx is None or ctx.layer is None else ctx.layer
      key = jax.random.fold_in(jax.random.key(self.seed), layer)
    else:
      key = self.make_rng("router")
    scores = jax.random.uniform(key, (tokens.shape[0], self.num_experts))
    return self._output(scores)
