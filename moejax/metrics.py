"""Load statistics of a routing plan and of a router distribution.

  load_e        valid assignments of expert e (counts c_e)
  MaxVio        (max_e c_e - mean_e c_e) / mean_e c_e  (DeepSeek, aux-loss-free 2024)
  load CV       std_e c_e / mean_e c_e
  entropy       mean_t -sum_e p_te log p_te   (per-token router uncertainty)
  marginal      -sum_e P_e log P_e with P = mean_t p_t   (spread of the mean
  entropy       distribution; minus `entropy` it is I(token; expert) in nats)
  experts/token valid assignments / T
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moejax import grouping
from moejax.core import RoutingPlan

Array = jax.Array


def max_violation(counts: Array) -> Array:
  """MaxVio = (max c - mean c) / mean c; 0 at perfect balance and for no load."""
  counts = counts.astype(jnp.float32)
  mean = jnp.mean(counts)
  return jnp.where(mean > 0, (jnp.max(counts) - mean) / jnp.maximum(mean, 1e-9), 0.0)


def coefficient_of_variation(counts: Array) -> Array:
  counts = counts.astype(jnp.float32)
  mean = jnp.mean(counts)
  return jnp.where(mean > 0, jnp.std(counts) / jnp.maximum(mean, 1e-9), 0.0)


def row_entropy(probs: Array) -> Array:
  """Entropy (nats) of each row of probs [..., E]; zero entries contribute
  nothing, with finite gradients."""
  probs = probs.astype(jnp.float32)
  positive = probs > 0
  safe = jnp.where(positive, probs, 1.0)
  return -jnp.sum(jnp.where(positive, safe * jnp.log(safe), 0.0), axis=-1)


def masked_mean(values: Array, mask: Optional[Array] = None, axis=None) -> Array:
  """Mean of values over the entries where mask [T] is True (all without a mask);
  0 when none is."""
  values = values.astype(jnp.float32)
  if mask is None:
    return jnp.mean(values, axis=axis)
  mask = mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim)).astype(jnp.float32)
  total = jnp.sum(values * mask, axis=axis)
  return total / jnp.maximum(jnp.sum(jnp.broadcast_to(mask, values.shape), axis=axis), 1.0)


def entropy(probs: Array, mask: Optional[Array] = None) -> Array:
  """Mean over the (masked) tokens of the entropy (nats) of each row of probs [T, E]."""
  return masked_mean(row_entropy(probs), mask)


def marginal_entropy(probs: Array, mask: Optional[Array] = None) -> Array:
  """Entropy (nats) of the mean distribution P = mean_t p_t over the (masked)
  tokens of probs [T, E]."""
  probs = probs.reshape(-1, probs.shape[-1])
  return entropy(masked_mean(probs, mask, axis=0))


def plan_metrics(plan: RoutingPlan, num_experts: int, num_tokens) -> dict[str, Array]:
  """Per-expert load [E] (float32 counts), MaxVio, load CV and experts per token
  (num_tokens: the real tokens, an int or a traced count)."""
  counts = grouping.expert_counts(plan.expert, plan.valid, num_experts).astype(jnp.float32)
  return {
      "load": counts,
      "max_violation": max_violation(counts),
      "load_cv": coefficient_of_variation(counts),
      "experts_per_token": jnp.sum(counts) / jnp.maximum(num_tokens, 1),
  }
