"""Routing over experts reused across adjacent layers, with progressive scaling.

"ReXMoE: Reusing Experts with Minimal Overhead in Mixture-of-Experts" (2025).
Groups of r adjacent MoE layers share a pool of r * E experts (the model's
`expert_reuse`; moejax.layer: the layer scores the pool ordered from its own E
experts on); each layer's router is a top-K gate over the whole pool,
W_g [D, r * E], so only the router grows: the experts are those of the plain
model. Progressive scaling routing (PSR) masks the candidates and unmasks them
over training:

  n(s) = E + floor((r E - E) * clip((s - psr_start) / psr_steps, 0, 1))
  candidates(s) = the first n(s) experts of the layer's pool order
  z'_e = z_e for e < n(s), else -inf;  p = softmax(z');  top-K of p

so training starts on the layer's own experts (the plain model's routing) and
ends on the whole pool. Everything else is the `topk` router (its options, the
`z` loss over the unmasked logits), but the `switch` loss is n sum_e f_e P_e over
the pool's distribution: the candidates' count n, not r E, so that it is 1 when
the candidates are balanced, as a plain layer's is over its E.

Choices the paper leaves open, taken here: the schedule is linear in steps
(`psr_steps`, 0 for the whole pool from the start); the experts are unmasked in
pool order from the layer's own, i.e. the next layers' in turn (with r = 2 the
only order); without a step (a forward outside training) the whole pool is a
candidate, the state training ends in once s >= psr_start + psr_steps; without a
pool (RoutingContext.own_experts None) the router is plain top-K.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from moejax import validation
from moejax.core import RouterOutput, RoutingContext
from moejax.routers.registry import register
from moejax.routers.topk import TopKRouter

Array = jax.Array


def psr_candidates(step: Array, own: int, pool: int, start: int, steps: int) -> Array:
  """n(step), the candidate count of progressive scaling routing (module docstring)."""
  if steps == 0:
    return jnp.asarray(pool, jnp.int32)
  progress = jnp.clip((jnp.asarray(step, jnp.float32) - start) / steps, 0.0, 1.0)
  return own + jnp.floor((pool - own) * progress).astype(jnp.int32)


@register("rexmoe")
class ReXMoERouter(TopKRouter):
  """Top-K over an expert pool shared by adjacent layers, candidates grown by PSR.

  Attributes:
    psr_start: the step at which the candidates start to grow.
    psr_steps: the steps over which they grow from the layer's own experts to
      the pool (0: the whole pool from the start, no PSR).
  """

  psr_start: int = 0
  psr_steps: int = 1000

  context_fields: ClassVar[frozenset] = TopKRouter.context_fields | {"step", "own_experts"}

  def __post_init__(self):
    validation.positive_int("psr_start", self.psr_start, minimum=0)
    validation.positive_int("psr_steps", self.psr_steps, minimum=0)
    super().__post_init__()

  def candidate_count(self, ctx: RoutingContext) -> Optional[Array]:
    """n(step), or None when every expert is a candidate."""
    own = ctx.own_experts
    if own is None or own >= self.num_experts or ctx.step is None:
      return None
    if own < self.top_k:
      raise ValueError(f"top_k ({self.top_k}) must be <= the layer's own experts ({own})")
    return psr_candidates(ctx.step, own, self.num_experts, self.psr_start, self.psr_steps)

  def candidates(self, ctx: RoutingContext) -> Optional[Array]:
    count = self.candidate_count(ctx)
    return None if count is None else jnp.arange(self.num_experts) < count

  def __call__(self, x: Array, ctx: Optional[RoutingContext] = None,
               deterministic: bool = True) -> RouterOutput:
    """As `topk`, the switch loss scaled from the pool's r E to the n candidates'
    count (n sum_e f_e P_e: 1 when balanced over the candidates, as per layer)."""
    out = super().__call__(x, ctx, deterministic)
    count = None if ctx is None else self.candidate_count(ctx)
    if count is None:
      return out
    scale = count.astype(jnp.float32) / self.num_experts
    return out.replace(losses={**out.losses, "switch": out.losses["switch"] * scale})
