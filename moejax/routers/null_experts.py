"""Null experts: top-K over E true and N null experts (AdaMoE, Zeng et al. 2024,
"AdaMoE: Token-Adaptive Routing with Null Experts for Mixture-of-Experts").

The gate scores E + N experts, z = x W_g [T, E + N]; top-K (softmax scores) picks
among all of them. A null expert outputs zero and costs nothing, so a slot that
lands on one is valid=False (no compute). A token thus uses K minus its null
selections of the true experts. With p = softmax(z) and S_t the token's selected
true experts, the combine weight of e in S_t (`normalize`, `normalize_over`):

  normalize_over='true_experts'  p_e / sum_{e' in S_t} p_e'   (default)
  normalize_over='all'           p_e / sum of the K selected p, nulls included:
                                 the nulls keep their mass and the true
                                 weights sum to less than 1
  normalize=False                p_e

The default is AdaMoE as published: the official code (github.com/CengZihao/
AdaMoE, exp_2 `adaptive_moe_utils.py`) renormalises the top-K probabilities over
the true experts only, so a token's true weights sum to 1 however many nulls it
chose. `all` is the reading moejax had before, kept as an option.

The ordinary switch loss over all E + N experts (balance.scoped_switch_loss,
with logits and probs of width E + N) sets how often nulls are used: balanced
over E + N, a token uses on average K * E / (E + N) true experts.

Metrics: `null_share` (share of the T * K slots on null experts) and
`flops_ratio`, true experts per token over `reference_k` (the fixed K it is
compared to, default top_k); `experts_per_token` comes from the layer. Both
are over the real tokens: padding (RoutingContext.segment_ids 0) is routed
nowhere and counted nowhere. Causal: each token alone.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from moejax import validation
from moejax.core import RouterOutput, RoutingContext
from moejax.routers.base import SwitchBalancedRouter, check_experts
from moejax.routers.registry import register
from moejax.routers.topk import TopKRouter

Array = jax.Array

NORMALIZE_OVER = ("true_experts", "all")


@register("null_experts")
class NullExpertsRouter(SwitchBalancedRouter):
  """Top-K over E true and N null experts. See the module docstring."""

  num_experts: int
  top_k: int = 2
  num_null: int = 8
  reference_k: Optional[int] = None
  normalize: bool = True
  normalize_over: str = "true_experts"

  loss_names: ClassVar[tuple[str, ...]] = TopKRouter.loss_names
  default_loss_weights: ClassVar[dict[str, float]] = TopKRouter.default_loss_weights
  has_expert_embeddings: ClassVar[bool] = True

  def __post_init__(self):
    validation.positive_int("num_null", self.num_null)
    check_experts(self.num_experts, self.top_k, self.num_experts + self.num_null,
                  "num_experts + num_null")
    if self.reference_k is not None:
      validation.positive_int("reference_k", self.reference_k)
    validation.one_of("normalize_over", self.normalize_over, NORMALIZE_OVER)
    super().__post_init__()

  def setup(self):
    self.scores = TopKRouter(self.num_experts + self.num_null, self.top_k,
                             normalize=self.normalize and self.normalize_over == "all",
                             balance_scope=self.balance_scope)

  def __call__(self, x: Array, ctx: Optional[RoutingContext] = None,
               deterministic: bool = True) -> RouterOutput:
    """x [B, L, D] (or [T, D]) -> RouterOutput with A = T * K slots, logits and
    probs of width E + N."""
    ctx = RoutingContext() if ctx is None else ctx
    routed = self.scores(x, ctx, deterministic)
    plan = routed.plan                        # padding slots already invalid
    num_tokens = routed.logits.shape[0]
    true = plan.expert < self.num_experts
    if self.normalize and self.normalize_over == "true_experts":
      weight = jnp.where(true & plan.valid, plan.weight, 0.0).reshape(num_tokens, -1)
      total = jnp.sum(weight, axis=-1, keepdims=True)
      weight = jnp.where(total > 0, weight / jnp.where(total > 0, total, 1.0), 0.0)
      plan = plan.replace(weight=weight.reshape(-1))
    real_slots = plan.valid
    plan = plan.masked(true).replace(expert=jnp.where(true, plan.expert, 0))
    real = ctx.token_mask(num_tokens).astype(jnp.float32)
    slots = jnp.maximum(jnp.sum(real_slots.astype(jnp.float32)), 1.0)
    true_slots = jnp.sum((true & real_slots).astype(jnp.float32))
    reference = self.reference_k or self.top_k
    return routed.replace(plan=plan, metrics={
        **routed.metrics,
        "null_share": jnp.sum((~true & real_slots).astype(jnp.float32)) / slots,
        "flops_ratio": true_slots / jnp.maximum(jnp.sum(real), 1.0) / reference})

  def expert_embeddings(self) -> Array:
    """The true experts' vectors [E, D]."""
    return self.scores.expert_embeddings()[:self.num_experts]
