"""What routers share: the gate projection, token flattening, the causality check.

Every router is a linen module `router(x [B, L, D], ctx, deterministic)` with
fields `num_experts` and `top_k`, returning a RouterOutput (Soft MoE: a
SoftRouting), and declares:

  loss_names            the losses it returns (unweighted)
  default_loss_weights  their weights when the layer is given none
  is_causal             False when a token's routing depends on other tokens of
                        the batch; such a router has `allow_noncausal` and a
                        `noncausal_reason`
  uses_rng              True when it draws from the `router` rng stream in training
  plan_layout           `token_major` (default: slot a belongs to token a // (A/T),
                        as RoutingPlan.from_topk lays it out) or `expert_major`
                        (expert choice: slots grouped by expert); expert
                        parallelism shards token-major plans by token

and optionally `update_state()` (after each optimizer step, on its `routing`
collection) and `expert_embeddings()` ([E, D] expert vectors, for the ERC loss).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import validation

Array = jax.Array

DEFAULT_KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def check_experts(num_experts: int, top_k: int, choosable: Optional[int] = None,
                  choosable_name: str = "num_experts") -> None:
  """num_experts and top_k positive integers, top_k at most the `choosable`
  experts (default num_experts; None for routers that may pick more, e.g. expert
  choice). Errors name the field."""
  validation.positive_int("num_experts", num_experts)
  validation.positive_int("top_k", top_k)
  if choosable is not None and top_k > choosable:
    raise ValueError(f"top_k ({top_k}) must be <= {choosable_name} ({choosable})")


def router_logits(x: Array, num_experts: int, kernel_init: Callable[..., Any],
                  name: str) -> Array:
  """z = x W [T, E] in float32, W with logical axes ('embed', None)."""
  return nn.Dense(num_experts, use_bias=False, dtype=jnp.float32,
                  param_dtype=jnp.float32, name=name,
                  kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", None)),
                  )(x.astype(jnp.float32))


def flatten_tokens(x: Array) -> tuple[Array, int]:
  """x [B, L, D] or [T, D] -> (float32 [T, D], B); B = 1 for [T, D]."""
  batch = x.shape[0] if x.ndim == 3 else 1
  return x.reshape(-1, x.shape[-1]).astype(jnp.float32), batch


def gate_kernel_columns(module: nn.Module, *path: str) -> Array:
  """The router's expert vectors [E, D]: columns of the gate kernel at `path`
  in the module's params (e.g. 'gate')."""
  params = module.variables["params"]
  for key in path:
    params = params[key]
  return jnp.asarray(nn.meta.unbox(params["kernel"]), jnp.float32).T


def check_causal(router: nn.Module) -> None:
  """Raises ValueError if `router` would leak future tokens in a causal model.

  A router that chooses among the tokens of a batch (expert choice, Sinkhorn in
  training, Soft MoE) lets token t's routing, and so its output, depend on tokens
  after t. It runs in a causal model only with allow_noncausal=True.
  """
  if getattr(router, "is_causal", True) or getattr(router, "allow_noncausal", False):
    return
  raise ValueError(
      f"allow_noncausal is False, but router {router.router_name!r} is not causal: "
      f"{router.noncausal_reason} In a causal "
      f"model this leaks future tokens into the routing of earlier ones; set "
      f"allow_noncausal=True to accept that (e.g. for a comparison whose losses say so)")
