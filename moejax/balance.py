"""Balance losses.

switch_loss  Switch Transformer (Fedus et al. 2021), load-balancing loss, as stated
             in "Demons in the Detail" (2025):

                 L = E * sum_e f_e P_e,
                 f_e = 1/(T K) sum_t sum_k 1[expert_tk = e]   (no gradient)
                 P_e = 1/T sum_t p_te

             Perfect balance gives exactly 1; all tokens on one expert with K = 1
             gives E. Scope here: the micro-batch the layer sees.
z_loss       ST-MoE (Zoph et al. 2022), router z-loss: mean_t (logsumexp_e z_te)^2.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def switch_loss(probs: Array, expert_index: Array, num_experts: int,
                mask: Optional[Array] = None) -> Array:
  """Switch load-balancing loss over one micro-batch.

  Args:
    probs: float[T, E], router distribution.
    expert_index: int[T, K], selected experts.
    num_experts: E; probs.shape[-1] must equal it.
    mask: optional bool[T, K]; False slots are not counted in f (variable-K
      routers). f is normalised by the number of counted slots.

  Returns:
    float32 scalar.
  """
  if probs.shape[-1] != num_experts:
    raise ValueError(f"probs has {probs.shape[-1]} experts, num_experts is {num_experts}")
  probs = probs.astype(jnp.float32)
  if mask is None:
    mask = jnp.ones(expert_index.shape, dtype=bool)
  one_hot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)
  counts = jnp.sum(one_hot * mask[..., None].astype(jnp.float32), axis=(0, 1))
  f = jax.lax.stop_gradient(counts / jnp.maximum(jnp.sum(mask), 1))
  p = jnp.mean(probs, axis=0)
  return num_experts * jnp.sum(f * p)


def z_loss(logits: Array) -> Array:
  """Router z-loss, mean_t (logsumexp_e z_te)^2, float32 scalar."""
  lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.square(lse))
