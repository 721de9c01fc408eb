"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Per sequence (the routing group, as an image is in the paper), with x [B, L, D]
and Phi [D, E * S] (S slots per expert):

  logits  = x Phi                         [B, L, E*S]
  D       = softmax over tokens (L)       dispatch weights
  C       = softmax over slots (E*S)      combine weights
  slots   = D^T x                         [B, E*S, D]   slot s goes to expert s // S
  y       = C  f(slots)                   [B, L, D]

Every token reaches every slot, so nothing is dropped and everything is
differentiable; the compute is B * E * S expert rows whatever the routing.
The default S = ceil(L * K / E) matches a top-K router's B * L * K rows; the
layer runs the slots through its engine and experts (moejax.soft_moe).

This router returns a SoftRouting, not a RouterOutput: Soft MoE has no list of
token-to-expert assignments. Not causal: a slot mixes every token of the
sequence, so token t's output depends on later tokens; a causal model needs
allow_noncausal=True. Padding tokens (RoutingContext.segment_ids 0) get no
dispatch weight; documents packed into one row do share its slots. Chosen where
the paper is open: no normalisation of x and Phi (the paper's l2 normalisation
with a learned scale matters at large D).
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from moejax import validation
from moejax.core import RoutingContext
from moejax.routers.base import DEFAULT_KERNEL_INIT, check_experts
from moejax.routers.registry import register

Array = jax.Array


@flax.struct.dataclass
class SoftRouting:
  """Dispatch and combine weights of Soft MoE.

  Attributes:
    dispatch: float32[B, L, E*S], softmax over L.
    combine: float32[B, L, E*S], softmax over E*S.
    logits: float32[B, L, E*S].
    slots_per_expert: S.
  """

  dispatch: jax.Array
  combine: jax.Array
  logits: jax.Array
  slots_per_expert: int = flax.struct.field(pytree_node=False)

  @property
  def probs(self) -> Array:
    """float32[T, E]: each token's combine mass per expert (sums to 1 per token)."""
    batch, length, num_slots = self.combine.shape
    per_expert = self.combine.reshape(batch * length, -1, self.slots_per_expert)
    return jnp.sum(per_expert, axis=-1)


@register("soft")
class SoftRouter(nn.Module):
  """Soft MoE dispatch and combine weights. See the module docstring."""

  num_experts: int
  top_k: int = 2
  slots_per_expert: Optional[int] = None
  allow_noncausal: bool = False
  kernel_init: Callable[..., Any] = DEFAULT_KERNEL_INIT

  loss_names: ClassVar[tuple[str, ...]] = ()
  default_loss_weights: ClassVar[dict[str, float]] = {}
  is_causal: ClassVar[bool] = False
  mixes_tokens: ClassVar[bool] = True
  noncausal_reason: ClassVar[str] = "each slot is a weighted mix of every token of the sequence."

  def __post_init__(self):
    check_experts(self.num_experts, self.top_k)
    if self.slots_per_expert is not None:
      validation.positive_int("slots_per_expert", self.slots_per_expert)
    super().__post_init__()

  def slots(self, length: int) -> int:
    """S: slots_per_expert, or ceil(L * K / E)."""
    if self.slots_per_expert is not None:
      return self.slots_per_expert
    return max(1, math.ceil(length * self.top_k / self.num_experts))

  @nn.compact
  def __call__(self, x: Array, ctx: Optional[RoutingContext] = None,
               deterministic: bool = True) -> SoftRouting:
    """x [B, L, D] -> SoftRouting over E * S slots per sequence."""
    del deterministic
    if x.ndim != 3:
      raise ValueError(f"router 'soft' needs x [B, L, D], got shape {x.shape}")
    phi = self.param("phi", nn.with_logical_partitioning(self.kernel_init, ("embed", None)),
                     (x.shape[-1], self.num_experts * self.slots(x.shape[1])), jnp.float32)
    phi = jnp.asarray(phi, jnp.float32)
    logits = jnp.einsum("bld,dn->bln", x.astype(jnp.float32), phi)
    dispatch_logits = logits
    if ctx is not None and ctx.segment_ids is not None:
      real = (ctx.segment_ids > 0)[..., None]
      dispatch_logits = jnp.where(real, logits, jnp.finfo(jnp.float32).min)
    return SoftRouting(dispatch=jax.nn.softmax(dispatch_logits, axis=1),
                       combine=jax.nn.softmax(logits, axis=-1), logits=logits,
                       slots_per_expert=phi.shape[1] // self.num_experts)
