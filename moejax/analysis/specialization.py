"""Expert specialisation: how much routing tells about a token label.

  joint_counts        C [N, E]: valid assignments of tokens with label n to expert e
  mutual_information  I(label; expert) = sum_ne p_ne log(p_ne / (p_n p_e)) in nats,
                      from C with p = C / sum(C)

With the domain as the label this is the expert-domain mutual information of
"Demons in the Detail" (2025); with the token id, OpenMoE's (2024) finding that
routing is mostly by token id. Plug-in estimate: biased upwards when C is sparse,
so compare values measured on the same data.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moejax.core import RoutingPlan

Array = jax.Array


def joint_counts(plan: RoutingPlan, labels: Array, num_labels: int, num_experts: int,
                 token_mask: Optional[Array] = None) -> Array:
  """float32[N, E] counts of valid assignments by (label of the token, expert).

  Args:
    plan: the executed plan over T tokens.
    labels: int[T] (or [B, L]) label of each token, in [0, num_labels).
    num_labels: N.
    num_experts: E.
    token_mask: optional bool[T] (or [B, L]); tokens to leave out (padding).
  """
  labels = labels.reshape(-1)
  keep = plan.valid
  if token_mask is not None:
    keep = keep & token_mask.reshape(-1)[plan.token]
  return jnp.zeros((num_labels, num_experts), jnp.float32).at[
      labels[plan.token], plan.expert].add(keep.astype(jnp.float32))


def mutual_information(joint: Array) -> Array:
  """I(label; expert) in nats from joint counts [N, E]; 0 for an empty table."""
  joint = joint.astype(jnp.float32)
  total = jnp.maximum(jnp.sum(joint), 1e-9)
  p = joint / total
  p_label = jnp.sum(p, axis=1, keepdims=True)
  p_expert = jnp.sum(p, axis=0, keepdims=True)
  ratio = jnp.where(p > 0, p / jnp.maximum(p_label * p_expert, 1e-30), 1.0)
  return jnp.sum(jnp.where(p > 0, p * jnp.log(ratio), 0.0))
