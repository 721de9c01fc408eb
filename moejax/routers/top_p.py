"""Top-p routing: as many experts as it takes to reach probability mass p.

"Harder Tasks Need More Experts: Dynamic Routing in MoE Models" (Huang et al.
2024). With p_t = softmax(x_t W_g) sorted descending, p_(1) >= p_(2) >= ...:

  k_t = min{k : sum_{j<=k} p_(j) >= threshold},  capped at K_max = top_k
  slots: the k_t largest experts, weights p_(j) (optionally renormalised)

A = T * K_max; slots past k_t are invalid. The router could buy more experts by
flattening p_t, so an entropy penalty on p_t, mean_t H(p_t), is returned as loss
`entropy` (weight 1e-4 by default, the paper's order of magnitude).
`switch` counts only the valid slots.

Chosen where the paper is open: mass exactly at the threshold stops (>=); the
paper does not cap k, we cap it at top_k so that the slot count is static, and
count the tokens the cap cut short (`capped_share`). Causal: each token alone.
Metrics: `experts_per_token` (from the layer, per layer) and `capped_share`.
Padding (RoutingContext.segment_ids 0) is routed nowhere (invalid slots) and
left out of every loss, count and mean (`entropy` and `capped_share` are means
over the real tokens).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import balance, metrics, validation
from moejax.core import RouterOutput, RoutingContext, RoutingPlan
from moejax.routers.base import (DEFAULT_KERNEL_INIT, SwitchBalancedRouter, check_experts,
                                 flatten_tokens,
                                 gate_kernel_columns, router_logits)
from moejax.routers.registry import register

Array = jax.Array


def top_p_mask(sorted_probs: Array, threshold: float) -> tuple[Array, Array]:
  """Keep mask [T, K] of the smallest prefix of sorted_probs [T, K] (descending)
  whose mass reaches `threshold`, and bool[T]: the prefix did not fit in K."""
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep = mass_before < threshold
  keep = keep.at[:, 0].set(True)
  short = jnp.sum(sorted_probs, axis=-1) < threshold
  return keep, short


@register("top_p")
class TopPRouter(SwitchBalancedRouter):
  """Tokens take experts until their mass reaches `threshold`. See module doc."""

  num_experts: int
  top_k: int = 2
  threshold: float = 0.4
  normalize: bool = False
  kernel_init: Callable[..., Any] = DEFAULT_KERNEL_INIT

  loss_names: ClassVar[tuple[str, ...]] = ("switch", "z", "entropy")
  default_loss_weights: ClassVar[dict[str, float]] = {"switch": 1e-2, "z": 1e-3,
                                                      "entropy": 1e-4}
  has_expert_embeddings: ClassVar[bool] = True

  def __post_init__(self):
    check_experts(self.num_experts, self.top_k, self.num_experts)
    validation.in_range("threshold", self.threshold, 0, 1, low_open=True)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, ctx: Optional[RoutingContext] = None,
               deterministic: bool = True) -> RouterOutput:
    """x [B, L, D] (or [T, D]) -> RouterOutput with A = T * K_max slots."""
    del deterministic
    ctx = RoutingContext() if ctx is None else ctx
    x, batch = flatten_tokens(x)
    real = ctx.token_mask(x.shape[0])
    logits = self.biased_logits(router_logits(x, self.num_experts, self.kernel_init, "gate"),
                                batch)
    probs = jax.nn.softmax(logits, axis=-1)
    top, expert_index = jax.lax.top_k(probs, self.top_k)               # [T, K_max]
    keep, short = top_p_mask(top, self.threshold)
    keep = keep & real[:, None]
    weights = jnp.where(keep, top, 0.0)
    if self.normalize:
      total = jnp.sum(weights, axis=-1, keepdims=True)
      weights = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)
    switch, counts = balance.router_switch_loss(probs, expert_index, batch,
                                                self.balance_scope, ctx, keep)
    losses = {"switch": switch, "z": balance.z_loss(logits, real),
              "entropy": balance.token_mean(metrics.row_entropy(probs), real)}
    return RouterOutput(plan=RoutingPlan.from_topk(expert_index, weights, keep),
                        logits=logits, probs=probs, losses=losses,
                        metrics={"selected": counts,
                                 "capped_share": balance.token_mean(short, real)},
                        counts=counts)

  def expert_embeddings(self) -> Array:
    return gate_kernel_columns(self, "gate")
