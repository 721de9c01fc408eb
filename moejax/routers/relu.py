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

s the step's gate sparsity: the share of closed gates (g_te = 0) over the step's
real tokens and the E experts, read before the K_max cap. ReMoE's controller
reads the sparsity of the ReLU router outputs themselves (ReMoE has no cap).
Read after the cap, s would be at least 1 - K_max / E whatever the gates do, and
with K_max / E <= 1 - target the controller would lower lambda while most gates
are open. lambda and the step's counts (open gates, gates) live in the `routing`
collection; update_state() applies the rule (rate = 1 keeps lambda fixed).
`switch` balances the active slots; its P, and `probs` for the metrics, is
softmax(z), the distribution whose order the gates follow. Chosen so because
g / sum_e g is zero for a token with no open gate, which would reward closing
every gate; for the same reason the router has no z-loss, whose optimum
(logsumexp z = 0) puts every logit below zero.

Metrics: `gate_sparsity` (share of closed gates per token, before the cap: what
the controller reads), `token_sparsity` (share of the E experts inactive per
token, after the cap: what runs), `chunk_sparsity` (share of (chunk, expert)
pairs with the expert inactive on all `chunk_size` consecutive tokens of a
sequence; a short last chunk counts as a chunk), `capped` (open gates the cap
cut), `l1_coef`. BlockFFN reports over 80% token-level and 70% 8-token
chunk-level sparsity. Causal: each token alone.

Padding (RoutingContext.segment_ids 0) is routed nowhere and counted nowhere:
every mean above is over the real tokens, the controller's counts hold real
tokens only, and chunks are cut from each row's real tokens (padding removed,
order kept), so a padded row has the chunks of its real tokens alone.
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

ORDERS = ("relu_rmsnorm", "rmsnorm_relu", "relu")


def active_matrix(plan: RoutingPlan, num_tokens: int, num_experts: int) -> Array:
  """bool[T, E]: expert e runs on token t in the plan."""
  hits = jnp.zeros((num_tokens, num_experts), jnp.int32)
  return hits.at[plan.token, plan.expert].add(plan.valid.astype(jnp.int32)) > 0


def chunk_sparsity(active: Array, chunk_size: int,
                   token_mask: Optional[Array] = None) -> Array:
  """Share of (chunk, expert) pairs of active [B, L, E] where the expert is
  inactive on every token of the chunk; L is padded with inactive tokens.

  With token_mask (bool[B, L], the real tokens) each row's real tokens are moved
  to its front, order kept, and only chunks holding a real token count: the
  chunks of the real tokens alone. 0 when no token is real.
  """
  batch, length, num_experts = active.shape
  if token_mask is None:
    token_mask = jnp.ones((batch, length), bool)
  order = jnp.argsort(~token_mask, axis=1, stable=True)            # real tokens first
  active = jnp.take_along_axis(active, order[..., None], axis=1)
  real = jnp.take_along_axis(token_mask, order, axis=1)
  chunks = -(-length // chunk_size)
  pad = chunks * chunk_size - length
  active = jnp.pad(active, ((0, 0), (0, pad), (0, 0)))
  real = jnp.pad(real, ((0, 0), (0, pad)))
  used = jnp.any(active.reshape(batch, chunks, chunk_size, num_experts), axis=2)
  counted = jnp.any(real.reshape(batch, chunks, chunk_size), axis=2)
  pairs = jnp.sum(counted.astype(jnp.float32)) * num_experts
  unused = pairs - jnp.sum((used & counted[..., None]).astype(jnp.float32))
  return unused / jnp.maximum(pairs, 1.0)


@register("relu")
class ReLURouter(SwitchBalancedRouter):
  """ReLU-gated routing with an adaptive L1 sparsity penalty. See module doc."""

  num_experts: int
  top_k: int = 2
  order: str = "relu_rmsnorm"
  target_sparsity: float = 0.75
  l1_init: float = 1e-2
  sparsity_rate: float = 1.2
  chunk_size: int = 8
  kernel_init: Callable[..., Any] = DEFAULT_KERNEL_INIT

  loss_names: ClassVar[tuple[str, ...]] = ("sparsity", "switch")
  default_loss_weights: ClassVar[dict[str, float]] = {"sparsity": 1.0, "switch": 1e-2}
  has_expert_embeddings: ClassVar[bool] = True

  def __post_init__(self):
    check_experts(self.num_experts, self.top_k, self.num_experts)
    validation.one_of("order", self.order, ORDERS)
    validation.in_range("target_sparsity", self.target_sparsity, 0, 1, high_open=True)
    validation.in_range("l1_init", self.l1_init, 0, math.inf)
    validation.in_range("sparsity_rate", self.sparsity_rate, 1, math.inf)
    validation.positive_int("chunk_size", self.chunk_size)
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
    real = ctx.token_mask(num_tokens)
    logits = self.biased_logits(router_logits(x, self.num_experts, self.kernel_init, "gate"),
                                batch)
    g = self.gates(logits)
    top, expert_index = jax.lax.top_k(g, self.top_k)
    keep = (top > 0) & real[:, None]
    plan = RoutingPlan.from_topk(jnp.where(keep, expert_index, 0), top, keep)
    active = active_matrix(plan, num_tokens, self.num_experts)        # real tokens only
    open_gates = (g > 0) & real[:, None]                              # before the cap
    num_open = jnp.sum(open_gates.astype(jnp.float32))
    capped = num_open - jnp.sum(active.astype(jnp.float32))
    closed_share = lambda on: 1.0 - jnp.mean(on.astype(jnp.float32), axis=-1)
    num_gates = jnp.sum(real.astype(jnp.float32)) * self.num_experts

    coef = self.variable("routing", "l1_coef", lambda: jnp.asarray(self.l1_init, jnp.float32))
    seen = self.variable("routing", "counts", lambda: jnp.zeros((2,), jnp.float32))
    if self.is_mutable_collection("routing") and not self.is_initializing():
      seen.value = seen.value + jnp.stack([num_open, num_gates])

    probs = jax.nn.softmax(logits, axis=-1)
    switch, counts = balance.router_switch_loss(probs, expert_index, batch,
                                                self.balance_scope, ctx, keep)
    losses = {"sparsity": coef.value * balance.token_mean(jnp.sum(g, axis=-1), real),
              "switch": switch}
    length = shape[1] if len(shape) == 3 else num_tokens
    metrics = {"selected": counts,
               "gate_sparsity": balance.token_mean(closed_share(open_gates), real),
               "token_sparsity": balance.token_mean(closed_share(active), real),
               "chunk_sparsity": chunk_sparsity(
                   active.reshape(batch, length, self.num_experts), self.chunk_size,
                   real.reshape(batch, length)),
               "capped": capped, "l1_coef": coef.value}
    return RouterOutput(plan=plan, logits=logits, probs=probs, losses=losses,
                        metrics=metrics, counts=counts)

  def update_state(self) -> None:
    """After an optimizer step: lambda <- lambda * rate ** sign(target - s) with s
    the step's gate sparsity (closed gates before the cap, real tokens only);
    counting restarts from zero."""
    if not self.has_variable("routing", "l1_coef"):
      return
    open_gates, total = self.get_variable("routing", "counts")
    sparsity = 1.0 - open_gates / jnp.maximum(total, 1.0)
    coef = self.get_variable("routing", "l1_coef")
    step = jnp.where(total > 0, jnp.sign(self.target_sparsity - sparsity), 0.0)
    self.put_variable("routing", "l1_coef", coef * self.sparsity_rate ** step)
    self.put_variable("routing", "counts", jnp.zeros((2,), jnp.float32))

  def expert_embeddings(self) -> Array:
    return gate_kernel_columns(self, "gate")
