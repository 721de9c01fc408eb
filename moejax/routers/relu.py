"""ReLU gates: an expert is active wherever its gate is positive.

ReMoE (Wang et al. 2024, "ReMoE: Fully Differentiable Mixture-of-Experts with
ReLU Routing") and BlockFFN (Song et al. 2025, "BlockFFN: Towards End-Side
Acceleration-Friendly Mixture-of-Experts with Chunk-Level Activation Sparsity").
With z = x W_g [T, E], the gate g [T, E] by `order`:

  relu_rmsnorm  g = RMSNorm(ReLU(z))   (BlockFFN)
  rmsnorm_relu  g = ReLU(RMSNorm(z))
  relu          g = ReLU(z)            (ReMoE)

Expert e is active for token t iff g_te > 0, at most K_max = top_k per token
(the largest gates; A = T * K_max, inactive slots invalid); the weights are g.
Active gates beyond K_max are cut and counted (`capped`).

Sparsity is driven by ReMoE's adaptive L1 penalty, loss `sparsity`:

  L = lambda * mean_t sum_e g_te,
  after each optimizer step: lambda <- lambda * rate ** sign(target - s),

s the step's token-level sparsity (share of inactive experts per token). lambda
and the step's counts live in the `routing` collection; update_state() applies
the rule (rate = 1 keeps lambda fixed). `switch` balances the active slots;
its P, and `probs` for the metrics, is softmax(z), the distribution whose order
the gates follow. Chosen so because g / sum_e g is zero for a token with no
open gate, which would reward closing every gate; for the same reason the router
has no z-loss, whose optimum (logsumexp z = 0) puts every logit below zero.

Metrics: `token_sparsity` (share of the E experts inactive per token, after the
cap), `chunk_sparsity` (share of (chunk, expert) pairs with the expert inactive on
all `chunk_size` consecutive tokens of a sequence; a short last chunk counts as
a chunk), `capped`, `l1_coef`. BlockFFN reports over 80% token-level and 70%
8-token chunk-level sparsity. Causal: each token alone.
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import balance, validation
from moejax.core import RouterOutput, RoutingContext, RoutingPlan
from moejax.routers.base import (DEFAULT_KERNEL_INIT, check_experts, flatten_tokens,
                                 gate_kernel_columns, router_logits)
from moejax.routers.registry import register

Array = jax.Array

ORDERS = ("relu_rmsnorm", "rmsnorm_relu", "relu")


def active_matrix(plan: RoutingPlan, num_tokens: int, num_experts: int) -> Array:
  """bool[T, E]: expert e runs on token t in the plan."""
  hits = jnp.zeros((num_tokens, num_experts), jnp.int32)
  return hits.at[plan.token, plan.expert].add(plan.valid.astype(jnp.int32)) > 0


def chunk_sparsity(active: Array, chunk_size: int) -> Array:
  """Share of (chunk, expert) pairs of active [B, L, E] where the expert is
  inactive on every token of the chunk; L is padded with inactive tokens."""
  batch, length, num_experts = active.shape
  chunks = -(-length // chunk_size)
  padded = jnp.pad(active, ((0, 0), (0, chunks * chunk_size - length), (0, 0)))
  used = jnp.any(padded.reshape(batch, chunks, chunk_size, num_experts), axis=2)
  return 1.0 - jnp.mean(used.astype(jnp.float32))


@register("relu")
class ReLURouter(nn.Module):
  """ReLU-gated routing with an adaptive L1 sparsity penalty. See module doc."""

  num_experts: int
  top_k: int = 2
  order: str = "relu_rmsnorm"
  target_sparsity: float = 0.75
  l1_init: float = 1e-2
  sparsity_rate: float = 1.2
  chunk_size: int = 8
  balance_scope: str = "microbatch"
  kernel_init: Callable[..., Any] = DEFAULT_KERNEL_INIT

  loss_names: ClassVar[tuple[str, ...]] = ("sparsity", "switch")
  default_loss_weights: ClassVar[dict[str, float]] = {"sparsity": 1.0, "switch": 1e-2}

  def __post_init__(self):
    check_experts(self.num_experts, self.top_k, self.num_experts)
    validation.one_of("order", self.order, ORDERS)
    validation.in_range("target_sparsity", self.target_sparsity, 0, 1, high_open=True)
    validation.in_range("l1_init", self.l1_init, 0, math.inf)
    validation.in_range("sparsity_rate", self.sparsity_rate, 1, math.inf)
    validation.positive_int("chunk_size", self.chunk_size)
    validation.one_of("balance_scope", self.balance_scope, balance.SCOPES)
    super().__post_init__()

  def gates(self, logits: Array) -> Array:
    """g [T, E] >= 0 by `order`."""
    norm = lambda z, name: nn.RMSNorm(dtype=jnp.float32, param_dtype=jnp.float32,
                                      name=name)(z)
    if self.order == "relu_rmsnorm":
      return norm(jax.nn.relu(logits), "gate_norm")
    if self.order == "rmsnorm_relu":
      return jax.nn.relu(norm(logits, "gate_norm"))
    return jax.nn.relu(logits)

  @nn.compact
  def __call__(self, x: Array, ctx: Optional[RoutingContext] = None,
               deterministic: bool = True) -> RouterOutput:
    """x [B, L, D] (or [T, D]) -> RouterOutput with A = T * K_max slots."""
    del deterministic
    ctx = RoutingContext() if ctx is None else ctx
    shape = x.shape
    x, batch = flatten_tokens(x)
    num_tokens = x.shape[0]
    logits = router_logits(x, self.num_experts, self.kernel_init, "gate")
    g = self.gates(logits)
    top, expert_index = jax.lax.top_k(g, self.top_k)
    keep = top > 0
    plan = RoutingPlan.from_topk(jnp.where(keep, expert_index, 0), top, keep)
    active = active_matrix(plan, num_tokens, self.num_experts)
    num_active = jnp.sum(active.astype(jnp.float32))
    capped = jnp.sum((g > 0).astype(jnp.float32)) - num_active
    token_sparsity = 1.0 - num_active / (num_tokens * self.num_experts)

    coef = self.variable("routing", "l1_coef", lambda: jnp.asarray(self.l1_init, jnp.float32))
    seen = self.variable("routing", "counts", lambda: jnp.zeros((2,), jnp.float32))
    if self.is_mutable_collection("routing") and not self.is_initializing():
      seen.value = seen.value + jnp.stack([num_active, float(num_tokens * self.num_experts)])

    probs = jax.nn.softmax(logits, axis=-1)
    switch, counts = balance.router_switch_loss(probs, expert_index, batch,
                                                self.balance_scope, ctx, keep)
    losses = {"sparsity": coef.value * jnp.mean(jnp.sum(g, axis=-1)), "switch": switch}
    length = shape[1] if len(shape) == 3 else num_tokens
    metrics = {"selected": counts, "token_sparsity": token_sparsity,
               "chunk_sparsity": chunk_sparsity(
                   active.reshape(batch, length, self.num_experts), self.chunk_size),
               "capped": capped, "l1_coef": coef.value}
    return RouterOutput(plan=plan, logits=logits, probs=probs, losses=losses,
                        metrics=metrics)

  def update_state(self) -> None:
    """After an optimizer step: lambda <- lambda * rate ** sign(target - s) with s
    the step's token-level sparsity; counting restarts from zero."""
    if not self.has_variable("routing", "l1_coef"):
      return
    active, total = self.get_variable("routing", "counts")
    sparsity = 1.0 - active / jnp.maximum(total, 1.0)
    coef = self.get_variable("routing", "l1_coef")
    step = jnp.where(total > 0, jnp.sign(self.target_sparsity - sparsity), 0.0)
    self.put_variable("routing", "l1_coef", coef * self.sparsity_rate ** step)
    self.put_variable("routing", "counts", jnp.zeros((2,), jnp.float32))

  def expert_embeddings(self) -> Array:
    return gate_kernel_columns(self, "gate")
