"""Tokens choose their top-K experts.

Softmax top-k: Shazeer et al. 2017, "Outrageously Large Neural Networks";
GShard (Lepikhin et al. 2020); Switch Transformer (Fedus et al. 2021).
With z_t = x_t W_g [T, E] and p_t = softmax(z_t):

  order='softmax_topk'  select the K largest p_te; weights p_te (GShard/Switch).
  order='topk_softmax'  select the K largest z_te; weights softmax over the K
                        selected logits (Mixtral, Jiang et al. 2024).

Sigmoid scores (DeepSeek-V3 2024): s_t = sigmoid(z_t), select the K largest s_te,
weights s_te. The distribution the balance loss reads is s_t / sum_e s_te.

Options:
  normalize   weights / sum of the K selected weights (a no-op for topk_softmax).
  scale       weights * scale (DeepSeek-V3's routed scaling factor).
  noisy       noisy top-k gating (Shazeer et al. 2017), training only:
              z_t + eps * softplus(x_t W_noise), eps ~ N(0, 1). W_noise starts at
              zero as in the paper, so the initial noise std is softplus(0) = 0.69.
  jitter      Switch's input jitter, training only: x * U(1 - j, 1 + j) before the
              router.
  num_groups, groups_selected, group_score
              group-limited selection (DeepSeek-V2 2024, "DeepSeek-V2: A Strong,
              Economical, and Efficient Mixture-of-Experts Language Model";
              DeepSeek-V3 2024): experts split into G groups of E/G; only experts
              of the G_sel best groups may be chosen. A group's score, from the
              selection scores s (bias included with aux_free) of its experts:
                max        max_{e in g} s_e                        (DeepSeek-V2)
                top2_sum   sum of the 2 largest s_e in g           (DeepSeek-V3)
                share_sum  sum of the ceil(K / G_sel) largest s_e in g: each
                           kept group's fair share of the K (no paper)
              Default `top2_sum`: V3's rule is the most recent, the one of the
              V3 recipe this router reproduces (sigmoid scores, aux-free bias),
              and a group's two best experts are a steadier signal than one.
              share_sum equals `max` when K <= G_sel and `top2_sum` when
              ceil(K / G_sel) = 2. A group of one expert scores by that expert
              under every rule.

Balancing:
  balance_scope  scope of the `switch` loss: sequence, microbatch or global
                 (balance.scoped_switch_loss).
  aux_free       auxiliary-loss-free balancing (DeepSeek 2024): a bias b [E] in the
                 `routing` collection is added to the selection scores (selection
                 only: combine weights use the unbiased scores); the step's
                 selection counts accumulate in `routing/counts`, and
                 `update_state()`, called after each optimizer step, applies
                 balance.bias_update (`bias_rate`, `bias_update`, `bias_recenter`).
                 With sigmoid scores, normalize and balance_scope='sequence' plus a
                 small switch weight, this is DeepSeek-V3's recipe.

Router math is float32 whatever the activation dtype. Training noise draws from
the `router` rng stream and is off when deterministic=True.
Losses: `switch` (balance.scoped_switch_loss over the K selections) and `z`
(z_loss). Metrics: `selected`, the selection counts per expert before capacity.
Padding (RoutingContext.segment_ids 0) is routed nowhere: its slots are invalid,
and it counts in no loss, no `selected` and no aux-free count.
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import balance, validation
from moejax.core import RouterOutput, RoutingContext, RoutingPlan
from moejax.routers.base import (DEFAULT_KERNEL_INIT, SwitchBalancedRouter, check_experts,
                                 flatten_tokens,
                                 gate_kernel_columns, router_logits)
from moejax.routers.registry import register

Array = jax.Array

SCORES = ("softmax", "sigmoid")
ORDERS = ("softmax_topk", "topk_softmax")
GROUP_SCORES = ("max", "top2_sum", "share_sum")
# The logit of an expert outside a router's candidates: exp() of it is 0 in float32.
MASKED_LOGIT = -1e30


def scores_per_group(group_score: str, top_k: int, groups_selected: int,
                      group_size: int) -> int:
  """How many of a group's largest scores sum to its score under `group_score`."""
  wanted = {"max": 1, "top2_sum": 2,
            "share_sum": math.ceil(top_k / groups_selected)}[group_score]
  return min(wanted, group_size)


def group_limited_mask(scores: Array, num_groups: int, groups_selected: int,
                       per_group: int) -> Array:
  """bool[T, E]: experts in the `groups_selected` best of `num_groups` groups.

  A group's score is the sum of its `per_group` largest entries of scores [T, E]
  (1: its max, DeepSeek-V2; 2: its top-2 sum, DeepSeek-V3).
  """
  num_tokens, num_experts = scores.shape
  grouped = scores.reshape(num_tokens, num_groups, num_experts // num_groups)
  group_score = jnp.sum(jax.lax.top_k(grouped, per_group)[0], axis=-1)
  _, best = jax.lax.top_k(group_score, groups_selected)
  keep = jnp.sum(jax.nn.one_hot(best, num_groups, dtype=jnp.int32), axis=1) > 0
  return jnp.repeat(keep, num_experts // num_groups, axis=1)


@register("topk")
class TopKRouter(SwitchBalancedRouter):
  """Top-K tokens-choose router with softmax or sigmoid scores. See module doc."""

  num_experts: int
  top_k: int = 2
  score: str = "softmax"
  order: str = "softmax_topk"
  normalize: bool = False
  scale: float = 1.0
  noisy: bool = False
  jitter: float = 0.0
  num_groups: int = 1
  groups_selected: Optional[int] = None
  group_score: str = "top2_sum"
  aux_free: bool = False
  bias_rate: float = 1e-3
  bias_update: str = "sign"
  bias_recenter: bool = False
  kernel_init: Callable[..., Any] = DEFAULT_KERNEL_INIT

  loss_names: ClassVar[tuple[str, ...]] = ("switch", "z")
  default_loss_weights: ClassVar[dict[str, float]] = {"switch": 1e-2, "z": 1e-3}
  has_expert_embeddings: ClassVar[bool] = True

  def __post_init__(self):
    check_experts(self.num_experts, self.top_k, self.num_experts)
    validation.one_of("score", self.score, SCORES)
    validation.one_of("order", self.order, ORDERS)
    if self.score == "sigmoid" and self.order == "topk_softmax":
      raise ValueError("order='topk_softmax' needs score='softmax'; sigmoid scores "
                       "are selected directly")
    validation.in_range("scale", self.scale, 0, math.inf, low_open=True)
    validation.in_range("jitter", self.jitter, 0, 1, high_open=True)
    validation.positive_int("num_groups", self.num_groups)
    if self.num_experts % self.num_groups:
      raise ValueError(f"num_groups ({self.num_groups}) must divide num_experts "
                       f"({self.num_experts})")
    selected = self.num_groups if self.groups_selected is None else self.groups_selected
    validation.positive_int("groups_selected", selected)
    if selected > self.num_groups:
      raise ValueError(f"groups_selected ({selected}) must be <= num_groups ({self.num_groups})")
    if self.top_k > selected * (self.num_experts // self.num_groups):
      raise ValueError(f"top_k ({self.top_k}) exceeds the experts in groups_selected "
                       f"({selected} groups of {self.num_experts // self.num_groups})")
    validation.one_of("group_score", self.group_score, GROUP_SCORES)
    validation.in_range("bias_rate", self.bias_rate, 0, math.inf)
    validation.one_of("bias_update", self.bias_update, balance.BIAS_UPDATES)
    super().__post_init__()

  @property
  def uses_rng(self) -> bool:
    return self.noisy or self.jitter > 0

  @nn.compact
  def __call__(self, x: Array, ctx: Optional[RoutingContext] = None,
               deterministic: bool = True) -> RouterOutput:
    """x [B, L, D] (or [T, D]) -> RouterOutput with A = T * K slots."""
    ctx = RoutingContext() if ctx is None else ctx
    x, batch = flatten_tokens(x)
    real = ctx.token_mask(x.shape[0])
    if self.jitter > 0 and not deterministic:
      x = x * jax.random.uniform(self.make_rng(self.rng_name), x.shape, jnp.float32,
                                 1.0 - self.jitter, 1.0 + self.jitter)
    logits, carry = self.gate_logits(x, ctx)
    logits = self.biased_logits(logits, batch)
    candidates = self.candidates(ctx)
    if candidates is not None:
      logits = jnp.where(candidates, logits, MASKED_LOGIT)
    if self.noisy:
      noise_std = jax.nn.softplus(router_logits(
          x, self.num_experts, nn.initializers.zeros_init(), "noise"))
      if not deterministic:
        logits = logits + noise_std * jax.random.normal(
            self.make_rng(self.rng_name), logits.shape, jnp.float32)

    if self.score == "sigmoid":
      # s / sum(s) as a softmax of log-sigmoids: finite even when every s underflows.
      scores = jax.nn.sigmoid(logits)
      probs = jax.nn.softmax(jax.nn.log_sigmoid(logits), axis=-1)
      selection = scores
    else:
      probs = scores = self.mix_probs(jax.nn.softmax(logits, axis=-1), x, ctx, batch)
      selection = logits if self.order == "topk_softmax" else scores

    if self.aux_free:
      bias = self.variable("routing", "bias", jnp.zeros, (self.num_experts,), jnp.float32)
      selection = selection + bias.value

    selected = self.num_groups if self.groups_selected is None else self.groups_selected
    if selected < self.num_groups:
      per_group = scores_per_group(self.group_score, self.top_k, selected,
                                    self.num_experts // self.num_groups)
      keep = group_limited_mask(selection, self.num_groups, selected, per_group)
      selection = jnp.where(keep, selection, -jnp.inf)

    _, expert_index = jax.lax.top_k(selection, self.top_k)
    if self.order == "topk_softmax":
      weights = jax.nn.softmax(jnp.take_along_axis(logits, expert_index, axis=-1), axis=-1)
    elif self.normalize:
      # p / sum(p) and s / sum(s) over the K selected, as softmaxes of log-scores.
      log_scores = (jax.nn.log_sigmoid(logits) if self.score == "sigmoid"
                    else jnp.log(jnp.maximum(scores, jnp.finfo(jnp.float32).tiny))
                    if self.mixes_probs else jax.nn.log_softmax(logits, axis=-1))
      weights = jax.nn.softmax(jnp.take_along_axis(log_scores, expert_index, axis=-1), axis=-1)
    else:
      weights = jnp.take_along_axis(scores, expert_index, axis=-1)
    weights = weights * self.scale

    switch, counts = balance.router_switch_loss(probs, expert_index, batch,
                                                self.balance_scope, ctx)
    if self.aux_free:
      accumulated = self.variable("routing", "counts", jnp.zeros, (self.num_experts,),
                                  jnp.float32)
      if self.is_mutable_collection("routing") and not self.is_initializing():
        accumulated.value = accumulated.value + counts
    losses = {"switch": switch, "z": balance.z_loss(logits, real)}
    valid = jnp.broadcast_to(real[:, None], expert_index.shape)
    return RouterOutput(plan=RoutingPlan.from_topk(expert_index, weights, valid),
                        logits=logits, probs=probs, losses=losses,
                        metrics={"selected": counts}, counts=counts, carry=carry)

  # Hooks of the routers built on this one (routers/recurrent.py, graph.py,
  # rexmoe.py); the defaults are plain top-K.
  mixes_probs: ClassVar[bool] = False

  def gate_logits(self, x: Array, ctx: RoutingContext) -> tuple[Array, Any]:
    """(logits z [T, E] from the router input x [T, D], the carry to hand on)."""
    del ctx
    return router_logits(x, self.num_experts, self.kernel_init, "gate"), None

  def candidates(self, ctx: RoutingContext) -> Optional[Array]:
    """bool[E]: the experts a token may choose (the others' logits are masked
    before the softmax); None: all of them."""
    del ctx
    return None

  def mix_probs(self, probs: Array, x: Array, ctx: RoutingContext, batch: int) -> Array:
    """The softmax distribution p [T, E] as selection and combine read it (a
    router that sets mixes_probs mixes it across tokens); p itself here."""
    del x, ctx, batch
    return probs

  def update_state(self) -> None:
    """After an optimizer step: move the aux-free bias by the step's counts, and
    start counting the next step from zero. A no-op without aux_free."""
    if not self.aux_free or not self.has_variable("routing", "bias"):
      return
    counts = self.get_variable("routing", "counts")
    bias = balance.bias_update(self.get_variable("routing", "bias"), counts, self.bias_rate,
                               self.bias_update, self.bias_recenter)
    self.put_variable("routing", "bias", bias)
    self.put_variable("routing", "counts", jnp.zeros_like(counts))

  def expert_embeddings(self) -> Array:
    """The router's expert vectors [E, D]: columns of the gate kernel W_g."""
    return gate_kernel_columns(self, "gate")
