"""Routers that do not learn: hash routing and random routing.

Both score every (token, expert) pair with a pseudo-random number u_te in [0, 1)
and take the K experts with the largest scores (K distinct experts, each expert
equally likely), with weights 1/K. They differ in what u depends on:

  hash    Hash layers (Roller et al. 2021, "Hash Layers For Large Sparse
          Models"): u_te = h(token id, e, layer, seed), a fixed integer hash, so
          a token id goes to the same experts in every batch, position and step
          (each layer with its own hash). Needs RoutingContext.token_ids.
  random  THOR (Zuo et al. 2021, "Taming Sparsely Activated Transformer with
          Stochastic Experts"): u drawn afresh from the `router` rng stream in
          training, by `draw`:
            per_batch  (default, THOR as published) one draw u [E] per call,
                       shared by every token: the whole batch goes to the same
                       K experts of the layer (THOR: K = 1)
            per_token  u [T, E]: each token its own K experts
          With deterministic=True, each token's u [E] comes from the fixed key
          (seed, layer, batch row, position), whatever `draw`: evaluation is
          reproducible, and a token's experts do not depend on the length of
          the batch it is in, so cached decoding routes as the full forward
          (positions from RoutingContext.positions, else 0..L-1).

What THOR's official code does (github.com/microsoft/Stochastic-Mixture-of-
Experts, thor/transformer_thor_layer.py): in training, each expert layer draws
one expert index with torch.randint per forward pass and runs the whole batch
through it (K = 1). At inference it runs every expert and keeps one output per
token by a fresh torch.randint draw at every call (`inference_level` 0, its
default), or (`inference_level` 1, "sentence level", the value of its run.sh)
one draw per position index shared by all sentences of the batch (the mask has
the length of fairseq's [L, B, D] first axis). We draw per token at evaluation,
the default's distribution, but from a fixed key rather than afresh.

THOR trains with two forward passes, each with its own random routing, and adds
a consistency loss between their predictions (`consistency_loss`, symmetric KL
(KL(p1||p2) + KL(p2||p1)) / 2 over the real target positions). The train step
does so when `consistency_weight` w > 0 and minimises

  1/2 (CE_1 + CE_2) + w * CR,

the paper's CE_1 + CE_2 + alpha * CR (so its code: loss1 + loss2 + alpha times
the symmetric KL) divided by 2: w = alpha / 2 (its run.sh's alpha = 5 is w = 2.5).
THOR reports that learned gates did no better than random routing: random is
the control of a comparison.

Neither router has parameters or losses; both are causal. probs is the plan's
own distribution (1/K on the chosen experts). Padding (RoutingContext.segment_ids
0) is routed nowhere: its slots are invalid.
"""
from __future__ import annotations

import math
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from moejax import validation
from moejax.core import RouterOutput, RoutingContext, RoutingPlan
from moejax.routers.base import Router, StepNeeds, check_experts, flatten_tokens
from moejax.routers.registry import register

Array = jax.Array

DRAWS = ("per_batch", "per_token")


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


class _UniformRouter(Router):
  num_experts: int
  top_k: int = 2
  seed: int = 0

  loss_names: ClassVar[tuple[str, ...]] = ()
  default_loss_weights: ClassVar[dict[str, float]] = {}
  takes_logit_bias: ClassVar[bool] = False

  def __post_init__(self):
    check_experts(self.num_experts, self.top_k, self.num_experts)
    validation.positive_int("seed", self.seed, minimum=0)
    super().__post_init__()

  def _output(self, scores: Array, ctx: Optional[RoutingContext]) -> RouterOutput:
    plan, probs = uniform_plan(scores, self.top_k)
    real = (RoutingContext() if ctx is None else ctx).token_mask(scores.shape[0])
    plan = plan.masked(jnp.repeat(real, self.top_k))
    return RouterOutput(plan=plan, logits=jnp.zeros_like(scores), probs=probs)


@register("hash")
class HashRouter(_UniformRouter):
  """Token id -> K fixed experts by an integer hash. See the module docstring."""

  context_fields: ClassVar[frozenset] = frozenset({"token_ids"})

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
    return self._output(hash_scores(ctx.token_ids, self.num_experts, self.seed, layer), ctx)


@register("random")
class RandomRouter(_UniformRouter):
  """K experts uniformly at random per token (THOR). See the module docstring.

  Attributes:
    draw: `per_batch` (THOR as published: one set of K experts per call in
      training, shared by all tokens) or `per_token`.
    consistency_weight: w, weight of THOR's consistency loss between two
      forward passes (w = alpha / 2 of the paper's alpha); the train step runs
      the second pass when it is positive.
  """

  draw: str = "per_batch"
  consistency_weight: float = 0.0
  uses_rng: ClassVar[bool] = True
  context_fields: ClassVar[frozenset] = frozenset({"positions"})

  def __post_init__(self):
    validation.one_of("draw", self.draw, DRAWS)
    validation.in_range("consistency_weight", self.consistency_weight, 0, math.inf)
    super().__post_init__()

  @property
  def step_needs(self) -> StepNeeds:
    """THOR's second stochastic pass while consistency_weight > 0."""
    return StepNeeds(consistency_weight=self.consistency_weight)

  def __call__(self, x: Array, ctx: Optional[RoutingContext] = None,
               deterministic: bool = True) -> RouterOutput:
    tokens, _ = flatten_tokens(x)
    shape = (tokens.shape[0], self.num_experts)
    if deterministic:
      layer = 0 if ctx is None or ctx.layer is None else ctx.layer
      batch = x.shape[0] if x.ndim == 3 else 1                  # x [B, L, D] or [T, D]
      length = tokens.shape[0] // batch
      positions = (jnp.broadcast_to(jnp.arange(length), (batch, length))
                   if ctx is None or ctx.positions is None else ctx.positions)
      rows = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, length))
      base = jax.random.fold_in(jax.random.key(self.seed), layer)
      draw = lambda row, position: jax.random.uniform(
          jax.random.fold_in(jax.random.fold_in(base, row), position), (self.num_experts,))
      scores = jax.vmap(draw)(rows.reshape(-1), jnp.reshape(positions, (-1,)))
    elif self.draw == "per_batch":
      scores = jnp.broadcast_to(
          jax.random.uniform(self.make_rng(self.rng_name), (self.num_experts,)), shape)
    else:
      scores = jax.random.uniform(self.make_rng(self.rng_name), shape)
    return self._output(scores, ctx)
