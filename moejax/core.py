"""The contracts between router, capacity and engine.

Axis letters, used in every docstring and einsum string of the package:

  B  batch                 L  sequence length        T  tokens, T = B * L
  D  model dimension       F  expert hidden width    E  routed experts
  K  experts per token     C  capacity per expert    A  assignment slots
  R  grouped rows          G  expert groups

A router scores the T tokens against E experts and returns a `RouterOutput`
whose `plan` is a flat list of A assignments (static A, fixed at trace time):

  tokens choose experts     A = T * K       slot a = t * K + k
  experts choose tokens     A = E * C
  variable experts/token    A = T * K_max   unused slots have valid=False

Invariant of every plan: among valid slots, a (token, expert) pair appears at
most once, so no expert receives more than T assignments.

An engine executes a plan: y[t] = sum_a [token_a = t] valid_a weight_a f_{expert_a}(x_t).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp

from moejax import grouping

AXES = {
    "B": "batch",
    "L": "sequence length",
    "T": "tokens (B * L)",
    "D": "model dimension",
    "F": "expert hidden width",
    "E": "routed experts",
    "K": "experts per token",
    "C": "capacity per expert",
    "A": "assignment slots",
    "R": "grouped rows",
    "G": "expert groups",
}

Array = jax.Array


@flax.struct.dataclass
class RoutingPlan:
  """A flat list of A assignments of token rows to experts.

  Attributes:
    token: int32[A], row of the flattened input x[T, D] that the slot reads.
    expert: int32[A], expert that processes it, in [0, E).
    weight: float32[A], combine weight; 0 where the slot is not valid.
    valid: bool[A], False for dropped assignments, null experts, padding and
      unused slots.
  """

  token: Array
  expert: Array
  weight: Array
  valid: Array

  @property
  def num_slots(self) -> int:
    return self.token.shape[0]

  @classmethod
  def from_topk(cls, expert_index: Array, weights: Array,
                valid: Optional[Array] = None) -> "RoutingPlan":
    """Plan of a tokens-choose router from `expert_index` and `weights` [T, K]."""
    num_tokens, k = expert_index.shape
    token = jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), k)
    if valid is None:
      valid = jnp.ones((num_tokens, k), dtype=bool)
    valid = valid.reshape(-1)
    weight = jnp.where(valid, weights.reshape(-1).astype(jnp.float32), 0.0)
    return cls(token=token, expert=expert_index.reshape(-1).astype(jnp.int32),
               weight=weight, valid=valid)

  def to_token_major(self, num_tokens: int, per_token: int) -> "RoutingPlan":
    """The same assignments laid out token-major: slot t * per_token + k holds
    token t's (k+1)-th valid assignment (in slot order); A' = T * per_token.

    Slots past a token's `per_token` valid assignments are invalid; a token with
    more valid assignments than `per_token` would lose them, so callers pass a
    bound that holds (e.g. E when each (token, expert) pair is unique).
    """
    rank = grouping.choice_rank(self.token, self.valid, num_tokens)
    size = num_tokens * per_token
    index = jnp.where(self.valid & (rank < per_token), self.token * per_token + rank, size)
    def place(values, fill):
      return jnp.full((size + 1,), fill, values.dtype).at[index].set(values)[:size]
    token = jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), per_token)
    return RoutingPlan(token=token, expert=place(self.expert, 0),
                       weight=place(self.weight, 0.0), valid=place(self.valid, False))

  def masked(self, keep: Array) -> "RoutingPlan":
    """The same plan with slots where `keep` is False made invalid."""
    valid = self.valid & keep
    return self.replace(valid=valid, weight=jnp.where(valid, self.weight, 0.0))


@flax.struct.dataclass
class RouterOutput:
  """What a router returns.

  Attributes:
    plan: the assignments; plan.token indexes the rows of `rows(x)` (the tokens).
    logits: float32[T, E_all], router logits (E_all counts null experts where a
      router has them).
    probs: float32[T, E_all], the distribution the balance losses and metrics read.
    losses: unweighted scalar losses by name; weights come from the layer config.
    metrics: router-specific metrics by name.
    counts: float32[E], this call's selection counts before capacity (the
      `global` balance scope sums them over a step), or None.
    carry: state handed to the next MoE layer of the model, or None.

  The layer runs y = to_tokens(engine(rows(x), plan, experts)). For a plan over
  tokens both are the identity; a router whose rows mix tokens (Soft MoE's
  slots) returns a subclass that maps tokens to rows and rows back to tokens.
  """

  plan: RoutingPlan
  logits: Array
  probs: Array
  losses: Mapping[str, Array] = flax.struct.field(default_factory=dict)
  metrics: Mapping[str, Array] = flax.struct.field(default_factory=dict)
  counts: Optional[Array] = None
  carry: Optional[Any] = None

  def rows(self, x: Array) -> Array:
    """x [T, D] -> the rows [R, D] the plan's `token` indexes: x itself."""
    return x

  def to_tokens(self, y: Array, num_tokens: int) -> Array:
    """The engine's output over the rows [R, D] -> y [T, D]: the same array."""
    del num_tokens
    return y

  @property
  def token_plan(self) -> RoutingPlan:
    """The assignments as tokens to experts, for metrics and analysis: the plan."""
    return self.plan


@flax.struct.dataclass
class RoutingContext:
  """What a router may know beyond x. Every field is optional.

  Attributes:
    positions: int32[B, L], position of each token in its sequence.
    segment_ids: int32[B, L], packed-sequence ids (0 marks padding).
    layer: index of the MoE layer in the model.
    step: training step, for schedules.
    attention: float32[B, L, L], head-averaged attention probabilities of the
      preceding attention block.
    carry: recurrent router state handed from the previous MoE layer.
    token_ids: int32[B, L], the ids fed at each position (the inputs, after the
      shift of a language model, never the targets); hash routing reads them.
    capacity: an externally set capacity per expert.
    global_counts: float32[E], this layer's selection counts over the whole
      optimizer step (all devices and micro-batches), for the `global` balance
      scope (StepNeeds.counts_for_loss).
    causal: True inside a causal (decoder) model; routers that look at other
      tokens of the sequence must refuse it.
    data_shards: how many data-parallel shards the batch is split into, for the
      `microbatch` balance scope (what one device sees).
    own_experts: with an expert pool shared by adjacent layers (ReXMoE), how many
      of the router's experts, the first in its order, are this layer's own;
      None without a pool.
  """

  positions: Optional[Array] = None
  segment_ids: Optional[Array] = None
  layer: Optional[Any] = None
  step: Optional[Array] = None
  attention: Optional[Array] = None
  carry: Optional[Any] = None
  token_ids: Optional[Array] = None
  capacity: Optional[Any] = None
  global_counts: Optional[Array] = None
  causal: bool = flax.struct.field(pytree_node=False, default=False)
  data_shards: int = flax.struct.field(pytree_node=False, default=1)
  own_experts: Optional[int] = flax.struct.field(pytree_node=False, default=None)

  def restricted(self, fields) -> "RoutingContext":
    """This context with only `fields` (and segment_ids, layer, causal, data_shards:
    every router must know padding) set: what a router that declares
    context_fields = fields receives."""
    keep = set(fields) | {"layer", "segment_ids"}
    return self.replace(**{f: None for f in ("positions", "segment_ids", "step", "attention",
                                             "carry", "token_ids", "capacity",
                                             "global_counts", "own_experts")
                                  if f not in keep})

  def token_mask(self, num_tokens: int) -> Array:
    """bool[T]: the real tokens of the flattened batch (segment id > 0); every
    token when segment_ids is not given. Padding is routed nowhere and counted
    nowhere: routers make its slots invalid and leave it out of their losses."""
    if self.segment_ids is None:
      return jnp.ones((num_tokens,), bool)
    return self.segment_ids.reshape(-1) > 0

  @property
  def layer_key(self) -> str:
    """The key of this layer in per-layer mappings (see layer_key)."""
    return layer_key(self.layer)


def layer_key(layer: int) -> str:
  """`layer_<i>`: the key of MoE layer i in per-layer mappings (aux, counts)."""
  return f"layer_{layer}"
