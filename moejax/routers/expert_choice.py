"""Experts choose their top-C tokens.

Expert choice (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice
Routing"): with S = softmax(x W_g) over experts [T, E], expert e takes the C
tokens with the largest S[:, e], each with combine weight S[t, e]:

  I_e = top-C_t S[t, e],   plan: (t, e, S[t, e]) for t in I_e     A = E * C

A token may get 0 to E experts; every expert gets exactly C tokens, so the load
is balanced by construction and there is no balance loss.

Capacity C = ceil(capacity_factor * T * K / E) (K = top_k), the compute of a
top-K router at capacity factor 1. Zhou et al. write k = n * c / e (n tokens,
e experts, c "the average number of experts per token"), with no K: our C is
theirs with c = capacity_factor * K (their EC-CF2, c = 2, is capacity_factor
1.0 with top_k 2, or 2.0 with top_k 1). T counts the padding of the batch too
(C is static), though padding is never chosen.

RoutingContext.capacity overrides C: a Python int sets C; a traced integer
(e.g. one capacity per denoising step, as in "Expert-Choice Routing Enables
Adaptive Computation in Diffusion Language Models", 2025) keeps A = E *
max_capacity slots (max_capacity defaults to T) and makes slots past the
capacity invalid.

Not causal: whether token t is among an expert's top C depends on every other
token of the batch, later ones included. In a decoder, t's output would then
depend on the future: training sees information that generation cannot have,
and the loss is optimistic. The router refuses a causal model unless
allow_noncausal=True.

Chosen where the paper is open: the C tokens are chosen among all T tokens of
the call (the batch is the routing group); ties go to the earlier token.
Padding tokens (RoutingContext.segment_ids 0) are never chosen: where an expert
would need them to fill C, its slots are invalid; the z-loss and
`unrouted_share` are over the real tokens.
Metrics: `unrouted_share` (share of the real tokens no expert took) and, from
the layer, `experts_per_token`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import balance, capacity, grouping, validation
from moejax.core import RouterOutput, RoutingContext, RoutingPlan
from moejax.routers.base import (DEFAULT_KERNEL_INIT, Router, check_experts, flatten_tokens,
                                 gate_kernel_columns, router_logits)
from moejax.routers.registry import register

Array = jax.Array


def expert_capacity(num_tokens: int, top_k: int, num_experts: int,
                    capacity_factor: float) -> int:
  """C = capacity.capacity (ceil(cf * T * K / E), at least 1), at most T."""
  return min(capacity.capacity(num_tokens, top_k, num_experts, capacity_factor), num_tokens)


def unrouted_share(plan: RoutingPlan, num_tokens: int,
                   token_mask: Optional[Array] = None) -> Array:
  """Share of the T tokens (of the real ones, with token_mask bool[T]) that no
  valid slot reads; 0 when no token is real."""
  hits = grouping.expert_counts(plan.token, plan.valid, num_tokens)   # slots per token
  return balance.token_mean(hits == 0, token_mask)


@register("expert_choice")
class ExpertChoiceRouter(Router):
  """Each expert takes its top-C tokens. See the module docstring."""

  num_experts: int
  top_k: int = 2
  capacity_factor: float = 1.0
  max_capacity: Optional[int] = None
  allow_noncausal: bool = False
  kernel_init: Callable[..., Any] = DEFAULT_KERNEL_INIT

  loss_names: ClassVar[tuple[str, ...]] = ("z",)
  default_loss_weights: ClassVar[dict[str, float]] = {"z": 1e-3}
  is_causal: ClassVar[bool] = False
  plan_layout: ClassVar[str] = "expert_major"
  has_expert_embeddings: ClassVar[bool] = True
  context_fields: ClassVar[frozenset] = frozenset({"capacity"})
  noncausal_reason: ClassVar[str] = ("each expert picks its top-C tokens among all tokens "
                                     "of the batch.")

  @property
  def noncausal_allowed(self) -> bool:
    return self.allow_noncausal

  def __post_init__(self):
    check_experts(self.num_experts, self.top_k)
    validation.in_range("capacity_factor", self.capacity_factor, 0, math.inf, low_open=True)
    if self.max_capacity is not None:
      validation.positive_int("max_capacity", self.max_capacity)
    super().__post_init__()

  def capacity(self, num_tokens: int, ctx: RoutingContext) -> tuple[int, Optional[Array]]:
    """(static C of the slot layout, traced capacity or None)."""
    if ctx.capacity is None:
      return expert_capacity(num_tokens, self.top_k, self.num_experts,
                             self.capacity_factor), None
    if isinstance(ctx.capacity, int) and not isinstance(ctx.capacity, bool):
      validation.positive_int("RoutingContext.capacity", ctx.capacity)
      return min(ctx.capacity, num_tokens), None
    limit = min(self.max_capacity or num_tokens, num_tokens)
    return limit, jnp.asarray(ctx.capacity, jnp.int32)

  @nn.compact
  def __call__(self, x: Array, ctx: Optional[RoutingContext] = None,
               deterministic: bool = True) -> RouterOutput:
    """x [B, L, D] (or [T, D]) -> RouterOutput with A = E * C slots."""
    del deterministic
    ctx = RoutingContext() if ctx is None else ctx
    x, batch = flatten_tokens(x)
    num_tokens = x.shape[0]
    logits = self.biased_logits(router_logits(x, self.num_experts, self.kernel_init, "gate"),
                                batch)
    probs = jax.nn.softmax(logits, axis=-1)                          # S [T, E]
    cap, traced = self.capacity(num_tokens, ctx)
    real = ctx.token_mask(num_tokens)
    score = jnp.where(real[:, None], probs, -1.0)                    # padding last
    weights, token = jax.lax.top_k(score.T, cap)                     # [E, C]
    valid = real[token]
    if traced is not None:
      valid = valid & (jnp.arange(cap)[None, :] < traced)
    expert = jnp.broadcast_to(jnp.arange(self.num_experts)[:, None], token.shape)
    plan = RoutingPlan(token=token.reshape(-1).astype(jnp.int32),
                       expert=expert.reshape(-1).astype(jnp.int32),
                       weight=jnp.where(valid, weights, 0.0).reshape(-1),
                       valid=valid.reshape(-1))
    return RouterOutput(plan=plan, logits=logits, probs=probs,
                        losses={"z": balance.z_loss(logits, real)},
                        metrics={"unrouted_share": unrouted_share(plan, num_tokens, real)})

  def expert_embeddings(self) -> Array:
    return gate_kernel_columns(self, "gate")
