"""Balanced assignment by Sinkhorn iterations: BASE / S-BASE and Selective Sinkhorn.

BASE layers (Lewis et al. 2021, "BASE Layers: Simplifying Training of Large,
Sparse Models") solve a balanced token-to-expert assignment in training; S-BASE
(Clark et al. 2022, "Unified Scaling Laws for Routed Language Models")
approximates it with Sinkhorn iterations and top-K. With z = x W_g [T, E]:

  log P <- z / eps
  n times:  rows    log P <- log P - logsumexp_e log P - log T   (rows sum to 1/T)
            columns log P <- log P - logsumexp_t log P - log E   (columns to 1/E)
  select    top-K of P[t]  (the plan, without gradient)

`sinkhorn`            gates from softmax(z) at the selected experts (S-BASE).
`selective_sinkhorn`  Selective Sinkhorn Routing (SSR, 2025): gates come from the
                      transport plan itself, T * P[t, e] (each row sums to about
                      1), differentiated through the iterations, and only a share
                      `fraction` of routing uses the plan; the rest is plain top-K
                      with softmax gates. SSR replaces the balance loss.

`fraction` and `fraction_of` say how much routing uses the plan in training:
`steps` draws once per call (a share of training steps, or of micro-batches),
`tokens` draws per token (the plan is still solved over all tokens). The paper
does not pin "selective" down; we default to 1.0 for `sinkhorn` and to 0.1 of
steps for `selective_sinkhorn`. Inference (deterministic=True) is plain top-K
with softmax gates, as in BASE, which cannot solve an assignment over tokens it
has not seen.

Not causal in training (fraction > 0): the plan's column constraint couples every
token of the batch, so token t's experts depend on later tokens. A causal model
needs allow_noncausal=True; generation, being deterministic, is unaffected.

Padding (RoutingContext.segment_ids 0) is left out of the transport problem: the
plan is solved over the T_real real tokens (rows sum to 1/T_real, the columns'
1/E is shared among real tokens only; SSR's gates are T_real * P[t, e]), so a
padded batch gets the plan of its real tokens alone. Padding slots are invalid
and padding counts in no loss, count or metric.

Metrics: `transport_share` (share of the real tokens routed by the plan) and
`sinkhorn_marginal_error` (max relative deviation of the plan's row and column
sums from uniform).
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

FRACTION_OF = ("steps", "tokens")


def solved_tokens(token_mask: Optional[Array], num_tokens: int) -> Array:
  """bool[T]: the rows of the transport problem, the real tokens (all tokens when
  there is no mask, or no real token: then every slot is invalid anyway)."""
  if token_mask is None:
    return jnp.ones((num_tokens,), bool)
  return token_mask | ~jnp.any(token_mask)


def sinkhorn_log_plan(logits: Array, iterations: int, epsilon: float,
                      token_mask: Optional[Array] = None) -> Array:
  """log P [T, E] after `iterations` row-then-column normalisations of exp(z / eps).

  Over the T_real rows where token_mask (bool[T]; None: all) is True, rows tend
  to 1/T_real and columns to 1/E; the last step fixes the columns exactly. Other
  rows are left out of the column sums and come back as log 0 = -inf.
  """
  num_tokens, num_experts = logits.shape
  solved = solved_tokens(token_mask, num_tokens)[:, None]
  log_rows = -jnp.log(jnp.sum(solved.astype(jnp.float32)))
  log_cols = -math.log(num_experts)

  def normalise(log_p, _):
    # Rows left out stay finite (zero gradient, no NaN) and out of the column sums.
    log_p = log_p - jax.nn.logsumexp(log_p, axis=1, keepdims=True) + log_rows
    columns = jax.nn.logsumexp(jnp.where(solved, log_p, -jnp.inf), axis=0, keepdims=True)
    return log_p - columns + log_cols, None

  start = jnp.where(solved, logits.astype(jnp.float32) / epsilon, 0.0)
  log_p, _ = jax.lax.scan(normalise, start, None, length=iterations)
  return jnp.where(solved, log_p, -jnp.inf)


def marginal_error(log_plan: Array, token_mask: Optional[Array] = None) -> Array:
  """max over the solved rows (see sinkhorn_log_plan) and the columns of
  |T_real * row sum - 1| and |E * column sum - 1|."""
  num_tokens, num_experts = log_plan.shape
  solved = solved_tokens(token_mask, num_tokens)
  plan = jnp.exp(log_plan)
  rows = jnp.abs(jnp.sum(solved.astype(jnp.float32)) * jnp.sum(plan, axis=1) - 1.0)
  cols = jnp.abs(num_experts * jnp.sum(plan, axis=0) - 1.0)
  return jnp.maximum(jnp.max(jnp.where(solved, rows, 0.0)), jnp.max(cols))


class _SinkhornBase(SwitchBalancedRouter):
  """Shared fields and routing; subclasses choose the gates of planned tokens."""

  num_experts: int
  top_k: int = 2
  iterations: int = 10
  epsilon: float = 1.0
  fraction: float = 1.0
  fraction_of: str = "steps"
  normalize: bool = False
  allow_noncausal: bool = False
  kernel_init: Callable[..., Any] = DEFAULT_KERNEL_INIT

  loss_names: ClassVar[tuple[str, ...]] = ("switch", "z")
  default_loss_weights: ClassVar[dict[str, float]] = {"z": 1e-3}
  noncausal_reason: ClassVar[str] = ("in training its transport plan balances experts over "
                                     "all tokens of the batch.")
  gates_from_plan: ClassVar[bool] = False
  has_expert_embeddings: ClassVar[bool] = True

  def __post_init__(self):
    check_experts(self.num_experts, self.top_k, self.num_experts)
    validation.positive_int("iterations", self.iterations)
    validation.in_range("epsilon", self.epsilon, 0, math.inf, low_open=True)
    validation.in_range("fraction", self.fraction, 0, 1)
    validation.one_of("fraction_of", self.fraction_of, FRACTION_OF)
    super().__post_init__()

  @property
  def is_causal(self) -> bool:
    return self.fraction == 0

  @property
  def noncausal_allowed(self) -> bool:
    return self.allow_noncausal

  @property
  def uses_rng(self) -> bool:
    return 0 < self.fraction < 1

  def _uses_plan(self, num_tokens: int) -> Array:
    """bool[T]: tokens whose routing comes from the transport plan."""
    if self.fraction == 1:
      return jnp.ones((num_tokens,), bool)
    draws = 1 if self.fraction_of == "steps" else num_tokens
    use = jax.random.uniform(self.make_rng(self.rng_name), (draws,)) < self.fraction
    return jnp.broadcast_to(use, (num_tokens,))

  @nn.compact
  def __call__(self, x: Array, ctx: Optional[RoutingContext] = None,
               deterministic: bool = True) -> RouterOutput:
    """x [B, L, D] (or [T, D]) -> RouterOutput with A = T * K slots."""
    ctx = RoutingContext() if ctx is None else ctx
    x, batch = flatten_tokens(x)
    num_tokens = x.shape[0]
    real = ctx.token_mask(num_tokens)
    logits = self.biased_logits(router_logits(x, self.num_experts, self.kernel_init, "gate"),
                                batch)
    probs = jax.nn.softmax(logits, axis=-1)
    _, greedy = jax.lax.top_k(probs, self.top_k)
    expert_index, weights = greedy, jnp.take_along_axis(probs, greedy, axis=-1)
    metrics = {"transport_share": jnp.zeros((), jnp.float32)}

    if not deterministic and self.fraction > 0:
      log_plan = sinkhorn_log_plan(logits, self.iterations, self.epsilon, real)
      _, planned = jax.lax.top_k(jax.lax.stop_gradient(log_plan), self.top_k)
      if self.gates_from_plan:
        solved = jnp.sum(solved_tokens(real, num_tokens).astype(jnp.float32))
        planned_weights = solved * jnp.exp(jnp.take_along_axis(log_plan, planned, -1))
      else:
        planned_weights = jnp.take_along_axis(probs, planned, axis=-1)
      use = self._uses_plan(num_tokens)
      expert_index = jnp.where(use[:, None], planned, greedy)
      weights = jnp.where(use[:, None], planned_weights, weights)
      metrics = {"transport_share": balance.token_mean(use, real),
                 "sinkhorn_marginal_error": marginal_error(jax.lax.stop_gradient(log_plan),
                                                           real)}

    if self.normalize:
      weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-9)
    switch, counts = balance.router_switch_loss(probs, expert_index, batch,
                                                self.balance_scope, ctx)
    valid = jnp.broadcast_to(real[:, None], expert_index.shape)
    return RouterOutput(plan=RoutingPlan.from_topk(expert_index, weights, valid),
                        logits=logits, probs=probs,
                        losses={"switch": switch, "z": balance.z_loss(logits, real)},
                        metrics={"selected": counts, **metrics}, counts=counts)

  def expert_embeddings(self) -> Array:
    return gate_kernel_columns(self, "gate")


@register("sinkhorn")
class SinkhornRouter(_SinkhornBase):
  """S-BASE: top-K of the Sinkhorn plan in training, softmax gates. See module doc."""


@register("selective_sinkhorn")
class SelectiveSinkhornRouter(_SinkhornBase):
  """SSR: a share of routing uses the Sinkhorn plan, gates from the plan."""

  fraction: float = 0.1
  gates_from_plan: ClassVar[bool] = True
