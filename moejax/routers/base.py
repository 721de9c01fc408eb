"""The router interface: every way a router talks to the rest of moejax.

A router is a linen module, a subclass of `Router`, with fields `num_experts`
(E) and `top_k` (K) and a call

  router(x [B, L, D], ctx: RoutingContext, deterministic) -> RouterOutput

that scores the T = B * L tokens and returns the plan (moejax.core). The layer,
the model, the train step and parallel/ ask a router only the questions `Router`
declares below, each with its default; a router overrides the ones that apply to
it, as a class attribute or a property:

  What it returns
    loss_names            the losses in RouterOutput.losses (unweighted)      ()
    default_loss_weights  their weights when the layer is given none          {}
    plan_layout           `token_major`: slot a belongs to token a // (A/T)
                          (RoutingPlan.from_topk); `expert_major`: slots grouped
                          by expert (expert choice); parallel/ lays an
                          expert-major plan out token-major      `token_major`
    mixes_tokens          True when the plan's rows are mixes of tokens (Soft
                          MoE's slots; RouterOutput.rows and .to_tokens map them),
                          so capacity and expert parallelism do not apply   False
    has_expert_embeddings True when expert_embeddings() gives [E, D] expert
                          vectors (the ERC coupling loss needs them)        False

  What it reads
    context_fields        the RoutingContext fields it reads beyond x: some of
                          positions, step, attention, carry, token_ids,
                          capacity, global_counts, own_experts. The model computes
                          `attention` (the preceding attention block's
                          head-averaged probabilities) only for a router that
                          declares it, and hands a router the fields it
                          declares (and segment_ids, layer, causal,
                          data_shards, which every router gets)            frozenset()
    is_causal             False when a token's routing depends on later tokens
                          of the batch; such a router has a field
                          `allow_noncausal` (noncausal_allowed) and a
                          `noncausal_reason`                                 True
    reads_earlier_tokens  True when a causal router's routing of token t reads
                          tokens before t of its sequence (graph-of-tokens
                          routing): cached decoding, one token at a time, cannot
                          route as the full forward does, so the layer refuses
                          decode=True                                       False
    uses_rng              True when it draws from its rng stream (the field
                          `rng_name`, set by the layer; default `router`) in
                          training (deterministic=False)                    False
    takes_logit_bias      True when its selection logits z [T, E'] take the
                          intervention bias (biased_logits); False for routers
                          without logits (hash, random)                      True

  What it hands on and keeps
    RouterOutput.carry    state for the next MoE layer of the model (read there
                          as ctx.carry, None at the first); declare "carry"   None
    update_state()        after each optimizer step, on its `routing`
                          collection (e.g. the aux-free bias)             no-op
    step_needs            what the training step must do for it (StepNeeds): a
                          second stochastic forward pass with a consistency loss,
                          or the step's selection counts before the gradient
                          pass (ctx.global_counts, from RouterOutput.counts) StepNeeds()

The intervention bias (moejax.interventions.bias): a router that takes it adds
delta [E'] (every token) or [B, E'] (per sequence), read from the `logit_bias`
collection, to its selection logits at apply time (biased_logits); E' is the
width of RouterOutput.logits. Without the collection nothing is added, so the
outputs are those of the plain model; `params` are never touched.

Padding (ctx.segment_ids 0) is never routed: its slots are invalid and it counts
in no loss or metric (ctx.token_mask).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import balance, validation

Array = jax.Array

DEFAULT_KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

PLAN_LAYOUTS = ("token_major", "expert_major")
LOGIT_BIAS = "logit_bias"      # the collection of the intervention bias
CONTEXT_FIELDS = frozenset({"positions", "step", "attention", "carry", "token_ids",
                            "capacity", "global_counts", "own_experts"})


@dataclasses.dataclass(frozen=True)
class StepNeeds:
  """What the training step must do for a router.

  Attributes:
    consistency_weight: w > 0 runs a second forward pass with independent router
      draws; the cross-entropy is the mean of both passes' and w times their
      symmetric KL is added (THOR, Zuo et al. 2021).
    counts_for_loss: a loss name: while that loss is weighted, the step first
      counts each layer's selections over all its micro-batches (forward only,
      from RouterOutput.counts) and hands them to the gradient pass as
      ctx.global_counts (the `global` balance scope).
  """

  consistency_weight: float = 0.0
  counts_for_loss: Optional[str] = None


class Router(nn.Module):
  """The base of every router: the declarations of the module docstring, with
  their defaults. Subclasses are linen modules with fields num_experts and top_k
  and a __call__(x, ctx, deterministic) -> RouterOutput."""

  rng_name: str = dataclasses.field(default="router", kw_only=True)

  router_name: ClassVar[str] = ""
  loss_names: ClassVar[tuple[str, ...]] = ()
  default_loss_weights: ClassVar[Mapping[str, float]] = {}
  plan_layout: ClassVar[str] = "token_major"
  mixes_tokens: ClassVar[bool] = False
  has_expert_embeddings: ClassVar[bool] = False
  context_fields: ClassVar[frozenset] = frozenset()
  noncausal_reason: ClassVar[str] = ""
  reads_earlier_tokens: ClassVar[bool] = False
  takes_logit_bias: ClassVar[bool] = True

  @property
  def is_causal(self) -> bool:
    """False when a token's routing depends on later tokens of the batch."""
    return True

  @property
  def noncausal_allowed(self) -> bool:
    """True when a router that is not causal may run in a causal model anyway (a
    non-causal router's own field `allow_noncausal`)."""
    return False

  @property
  def uses_rng(self) -> bool:
    """Whether it draws from the rng stream `rng_name` in training."""
    return False

  @property
  def step_needs(self) -> StepNeeds:
    """What the training step must do for this router."""
    return StepNeeds()

  def update_state(self) -> None:
    """After an optimizer step (applied with mutable=['routing']): update the
    router's `routing` collection. Nothing by default."""

  def biased_logits(self, logits: Array, batch: int) -> Array:
    """logits z [T, E'] plus the intervention bias delta of the `logit_bias`
    collection: [E'] for every token, or [B, E'] per sequence (T = B * L). Without
    the collection z itself. Applied with the collection mutable (and not at init),
    delta is created as zeros [E'], which is how moejax.interventions.bias finds
    every router's width."""
    width = logits.shape[-1]
    if self.has_variable(LOGIT_BIAS, "delta"):
      delta = jnp.asarray(self.get_variable(LOGIT_BIAS, "delta"), jnp.float32)
    elif self.is_mutable_collection(LOGIT_BIAS) and not self.is_initializing():
      delta = self.variable(LOGIT_BIAS, "delta", jnp.zeros, (width,), jnp.float32).value
    else:
      return logits
    if delta.ndim == 1 and delta.shape == (width,):
      return logits + delta
    if delta.shape == (batch, width):
      per_sequence = logits.reshape(batch, -1, width) + delta[:, None, :]
      return per_sequence.reshape(logits.shape)
    raise ValueError(f"logit bias: router {self.router_name!r} at {'/'.join(self.path)} has "
                     f"{width} logits per token and a batch of {batch}, so its delta must be "
                     f"[{width}] or [{batch}, {width}]; got shape {tuple(delta.shape)}")

  def expert_embeddings(self) -> Array:
    """[E, D] expert vectors (routers with has_expert_embeddings)."""
    raise TypeError(f"router {self.router_name!r} has no expert vectors "
                    "(has_expert_embeddings is False)")


class SwitchBalancedRouter(Router):
  """A router balanced by the switch loss at a scope (balance.scoped_switch_loss):
  the field `balance_scope` (sequence, microbatch or global) and what the `global`
  scope needs, the step's selection counts as ctx.global_counts."""

  balance_scope: str = dataclasses.field(default="microbatch", kw_only=True)

  context_fields: ClassVar[frozenset] = frozenset({"global_counts"})

  def __post_init__(self):
    validation.one_of("balance_scope", self.balance_scope, balance.SCOPES)
    super().__post_init__()

  @property
  def step_needs(self) -> StepNeeds:
    return StepNeeds(counts_for_loss="switch" if self.balance_scope == "global" else None)


def check_declarations(cls: type) -> None:
  """Raises TypeError when a registered router class declares something the
  interface does not allow (an unknown plan layout or context field)."""
  if not (isinstance(cls, type) and issubclass(cls, Router)):
    raise TypeError(f"a router must subclass moejax.routers.Router, got {cls!r}")
  if cls.plan_layout not in PLAN_LAYOUTS:
    raise TypeError(f"{cls.__name__}.plan_layout must be one of {PLAN_LAYOUTS}, got "
                    f"{cls.plan_layout!r}")
  unknown = sorted(set(cls.context_fields) - CONTEXT_FIELDS)
  if unknown:
    raise TypeError(f"{cls.__name__}.context_fields has {unknown}, which RoutingContext "
                    f"does not offer; fields: {sorted(CONTEXT_FIELDS)}")


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
  if router.is_causal or router.noncausal_allowed:
    return
  raise ValueError(
      f"allow_noncausal is False, but router {router.router_name!r} is not causal: "
      f"{router.noncausal_reason} In a causal "
      f"model this leaks future tokens into the routing of earlier ones; set "
      f"allow_noncausal=True to accept that (e.g. for a comparison whose losses say so)")
