"""Null experts: top-K over E true and N null experts (AdaMoE, Zeng et al. 2024,
"AdaMoE: Token-Adaptive Routing with Null Experts for Mixture-of-Experts").

The gate scores E + N experts, z = x W_g [T, E + N]; top-K (softmax scores) picks
among all of them. A null expert outputs zero and costs nothing, so a slot that
lands on one is valid=False (no compute) but keeps its probability mass: with
`normalize`, weights are renormalised over all K selections, nulls included.
A token thus uses K minus its null selections of the true experts.

The ordinary switch loss over all E + N experts (balance.scoped_switch_loss,
with logits and probs of width E + N) sets how often nulls are used: balanced
over E + N, a token uses on average K * E / (E + N) true experts.

Metrics: `null_share` (share of the T * K slots on null experts) and
`flops_ratio`, true experts per token over `reference_k` (the fixed K it is
compared to, default top_k); `experts_per_token` comes from the layer.
Causal: each token alone.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import validation
from moejax.core import RouterOutput, RoutingContext
from moejax.routers.base import check_experts
from moejax.routers.registry import register
from moejax.routers.topk import TopKRouter

Array = jax.Array


@register("null_experts")
class NullExpertsRouter(nn.Module):
  """Top-K over E true and N null experts. See the module docstring."""

  num_experts: int
  top_k: int = 2
  num_null: int = 8
  reference_k: Optional[int] = None
  normalize: bool = True
  balance_scope: str = "microbatch"

  loss_names: ClassVar[tuple[str, ...]] = TopKRouter.loss_names
  default_loss_weights: ClassVar[dict[str, float]] = TopKRouter.default_loss_weights

  def __post_init__(self):
    validation.positive_int("num_null", self.num_null)
    check_experts(self.num_experts, self.top_k, self.num_experts + self.num_null,
                  "num_experts + num_null")
    if self.reference_k is not None:
      validation.positive_int("reference_k", self.reference_k)
    super().__post_init__()

  def setup(self):
    self.scores = TopKRouter(self.num_experts + self.num_null, self.top_k,
                             normalize=self.normalize, balance_scope=self.balance_scope)

  def __call__(self, x: Array, ctx: Optional[RoutingContext] = None,
               deterministic: bool = True) -> RouterOutput:
    """x [B, L, D] (or [T, D]) -> RouterOutput with A = T * K slots, logits and
    probs of width E + N."""
    routed = self.scores(x, ctx, deterministic)
    plan = routed.plan
    true = plan.expert < self.num_experts
    plan = plan.masked(true).replace(expert=jnp.where(true, plan.expert, 0))
    num_tokens = routed.logits.shape[0]
    true_per_token = jnp.sum(true.astype(jnp.float32)) / num_tokens
    reference = self.reference_k or self.top_k
    return routed.replace(plan=plan, metrics={
        **routed.metrics,
        "null_share": 1.0 - jnp.mean(true.astype(jnp.float32)),
        "flops_ratio": true_per_token / reference})

  def expert_embeddings(self) -> Array:
    """The true experts' vectors [E, D]."""
    return self.scores.expert_embeddings()[:self.num_experts]
