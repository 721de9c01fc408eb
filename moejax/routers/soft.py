"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Per sequence (the routing group, as an image is in the paper), with x [B, L, D]
and Phi [D, E * S] (S slots per expert):

  logits  = x Phi                         [B, L, E*S]
  D       = softmax over tokens (L)       dispatch weights
  C       = softmax over slots (E*S)      combine weights
  slots   = D^T x                         [B, E*S, D]   slot s goes to expert s // S
  y       = C  f(slots)                   [B, L, D]

Every token reaches every slot, so nothing is dropped and everything is
differentiable. The router's output is a RouterOutput like every router's
(SlotRouting): its plan assigns slot row b*E*S + s, weight 1, to expert s // S;
`rows` mixes the tokens into those rows and `to_tokens` combines the experts'
outputs back, so the layer runs Soft MoE through its usual engine and experts.
The compute is B * E * S expert rows whatever the routing.

S is fixed at construction (`slots_per_expert`, default 1), so the parameters do
not depend on the sequence length; S = L * K / E gives a top-K router's B * L * K
rows at sequence length L (configs/router_zoo.py:soft sets it so).

Not causal: a slot mixes every token of the sequence, so token t's output depends
on later tokens; a causal model needs allow_noncausal=True. Padding tokens
(segment id 0) get no dispatch weight, and their rows of the combine are zero;
documents packed into one row do share its slots. Chosen where the paper is open:
no normalisation of x and Phi (the paper's l2 normalisation with a learned scale
matters at large D). For metrics and analysis, `token_plan` gives each token its
expert of largest combine mass.

The intervention bias (routers/base.py, biased_logits) of expert e is added to
each of its S slot logits. A constant per slot cancels in the dispatch softmax
over tokens, so the bias moves the combine weights alone: how much of each
token's output comes from expert e.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from moejax import validation
from moejax.core import RouterOutput, RoutingContext, RoutingPlan
from moejax.routers.base import DEFAULT_KERNEL_INIT, Router, check_experts
from moejax.routers.registry import register

Array = jax.Array


def slot_plan(batch: int, num_experts: int, slots_per_expert: int) -> RoutingPlan:
  """One weight-1 assignment per slot row: row b*E*S + s to expert s // S."""
  rows = jnp.arange(batch * num_experts * slots_per_expert, dtype=jnp.int32)
  expert = (rows % (num_experts * slots_per_expert)) // slots_per_expert
  return RoutingPlan(token=rows, expert=expert.astype(jnp.int32),
                     weight=jnp.ones(rows.shape, jnp.float32), valid=jnp.ones(rows.shape, bool))


@flax.struct.dataclass
class SlotRouting(RouterOutput):
  """Soft MoE's RouterOutput: the plan runs B * E * S slot rows.

  Attributes (beyond RouterOutput's):
    dispatch: float32[B, L, E*S], softmax over L (zero on padding).
    combine: float32[B, L, E*S], softmax over E*S (zero on padding).
  """

  dispatch: Optional[Array] = None
  combine: Optional[Array] = None

  def rows(self, x: Array) -> Array:
    """x [T, D] -> slots [B*E*S, D]: each slot a dispatch-weighted mix of its
    sequence's tokens."""
    batch, length, num_slots = self.dispatch.shape
    x = x.reshape(batch, length, x.shape[-1])
    slots = jnp.einsum("bln,bld->bnd", self.dispatch.astype(x.dtype), x)
    return slots.reshape(batch * num_slots, x.shape[-1])

  def to_tokens(self, y: Array, num_tokens: int) -> Array:
    """The experts' outputs over the slots [B*E*S, D] -> y [T, D]."""
    batch, length, num_slots = self.combine.shape
    out = y.reshape(batch, num_slots, y.shape[-1])
    tokens = jnp.einsum("bln,bnd->bld", self.combine.astype(y.dtype), out)
    return tokens.reshape(num_tokens, y.shape[-1])

  @property
  def token_plan(self) -> RoutingPlan:
    """Each token's expert of largest combine mass, weighted by that mass (padding
    invalid)."""
    expert = jnp.argmax(self.probs, axis=-1)
    weight = jnp.take_along_axis(self.probs, expert[:, None], axis=-1)
    real = jnp.sum(self.probs, axis=-1, keepdims=True) > 0
    return RoutingPlan.from_topk(expert[:, None].astype(jnp.int32), weight, real)


@register("soft")
class SoftRouter(Router):
  """Soft MoE dispatch and combine weights. See the module docstring."""

  num_experts: int
  top_k: int = 2
  slots_per_expert: int = 1
  allow_noncausal: bool = False
  kernel_init: Callable[..., Any] = DEFAULT_KERNEL_INIT

  is_causal: ClassVar[bool] = False
  mixes_tokens: ClassVar[bool] = True
  noncausal_reason: ClassVar[str] = "each slot is a weighted mix of every token of the sequence."

  def __post_init__(self):
    check_experts(self.num_experts, self.top_k)
    validation.positive_int("slots_per_expert", self.slots_per_expert)
    super().__post_init__()

  @property
  def noncausal_allowed(self) -> bool:
    return self.allow_noncausal

  @nn.compact
  def __call__(self, x: Array, ctx: Optional[RoutingContext] = None,
               deterministic: bool = True) -> SlotRouting:
    """x [B, L, D] -> SlotRouting over E * S slots per sequence."""
    del deterministic
    if x.ndim != 3:
      raise ValueError(f"router 'soft' needs x [B, L, D], got shape {x.shape}")
    ctx = RoutingContext() if ctx is None else ctx
    batch, length, _ = x.shape
    num_slots = self.num_experts * self.slots_per_expert
    phi = self.param("phi", nn.with_logical_partitioning(self.kernel_init, ("embed", None)),
                     (x.shape[-1], num_slots), jnp.float32)
    logits = jnp.einsum("bld,dn->bln", x.astype(jnp.float32), jnp.asarray(phi, jnp.float32))
    expert_bias = self.biased_logits(jnp.zeros((batch * length, self.num_experts)), batch)
    logits = logits + jnp.repeat(expert_bias.reshape(batch, length, self.num_experts),
                                 self.slots_per_expert, axis=-1)
    real = ctx.token_mask(batch * length).reshape(batch, length, 1)
    dispatch = jax.nn.softmax(jnp.where(real, logits, jnp.finfo(jnp.float32).min), axis=1)
    combine = jnp.where(real, jax.nn.softmax(logits, axis=-1), 0.0)
    per_expert = (batch * length, self.num_experts, self.slots_per_expert)
    probs = jnp.sum(combine.reshape(per_expert), axis=-1)                 # [T, E]
    expert_logits = jax.nn.logsumexp(logits.reshape(per_expert), axis=-1)  # [T, E]
    return SlotRouting(plan=slot_plan(batch, self.num_experts, self.slots_per_expert),
                       logits=expert_logits, probs=probs, dispatch=dispatch, combine=combine)
