"""Routing over a graph of tokens: similarity-aware and attention-aware top-K.

"Improving Routing in Sparse Mixture of Experts with Graph of Tokens" (Nguyen et
al. 2025). A token's routing distribution is mixed with those of the tokens it is
linked to, so that related tokens route alike and a token's choice wavers less:

  p   = softmax(x W_g)                                 [T, E]
  p'  = (1 - a) p + a S p                              S [L, L] per sequence
  top-K of p', combine weights p' (normalised over the K if `normalize`)

  similarity       S = softmax_j(x_t . x_j / tau) over the tokens j the model lets
                   t see: j <= t in a causal model, and only j of t's own packed
                   segment; tau = `temperature` (default sqrt(D), as in
                   attention's scaling). x is the router input (the block's
                   normalised hidden state).
  attention_aware  S = the head-averaged attention probabilities of the
                   attention block just before the MoE layer (RoutingContext.
                   attention, [B, L, L]): causal and segment-masked already.

The mixing share a (`mix`, default 1: p' = S p, the paper's rule) keeps part of
the token's own distribution when below 1. The balance (`switch`) loss and the
metrics read p'. Choices the paper's text leaves open, taken here: tokens are
compared by their raw router inputs (no projection); attention-aware routing
reads the attention without gradient (the router's loss does not train the
attention). Both mix only over tokens t may see, so both are causal in a causal
model; in a non-causal one (TransformerLM(causal=False)) similarity reads the
whole segment. In cached decoding (one token at a time) a token would see no
other token and route differently from the full forward, so the layer refuses
decode=True for them (reads_earlier_tokens): they are for training and
full-sequence evaluation.
"""
from __future__ import annotations

import math
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from moejax import validation
from moejax.core import RoutingContext
from moejax.routers.registry import register
from moejax.routers.topk import TopKRouter

Array = jax.Array


def token_graph_mask(ctx: RoutingContext, batch: int, length: int) -> Array:
  """bool[B or 1, L, L]: j visible to t: j <= t when ctx.causal, the same packed
  segment and j a real token when ctx.segment_ids is given."""
  visible = jnp.ones((length, length), bool)
  if ctx.causal:
    visible = jnp.tril(visible)
  visible = visible[None]
  if ctx.segment_ids is not None:
    segments = ctx.segment_ids.reshape(batch, length)
    visible = (visible & (segments[:, :, None] == segments[:, None, :])
               & (segments[:, None, :] > 0))
  return visible


def similarity_graph(x: Array, visible: Array, temperature: float) -> Array:
  """S [B, L, L] = softmax_j(x_t . x_j / temperature) over visible j (x [B, L, D]);
  a row with nothing visible (padding) is uniform and routes nowhere anyway."""
  scores = jnp.einsum("btd,bjd->btj", x, x) / temperature
  scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores, axis=-1)


def mix_over_graph(probs: Array, graph: Array, share: float) -> Array:
  """(1 - share) p + share S p, for p [T, E] = [B * L, E] and S [B, L, L]."""
  batch, length = graph.shape[0], graph.shape[-1]
  p = probs.reshape(batch, length, -1)
  mixed = jnp.einsum("btj,bje->bte", graph, p).reshape(probs.shape)
  return (1.0 - share) * probs + share * mixed


class GraphRouter(TopKRouter):
  """Top-K over a distribution mixed across tokens (see the module docstring).
  Softmax scores with order `softmax_topk` only: the mixed p' is what is selected.
  A subclass defines graph(x [T, D], ctx, batch) -> S [B, L, L]."""

  mix: float = 1.0

  mixes_probs: ClassVar[bool] = True
  reads_earlier_tokens: ClassVar[bool] = True

  def __post_init__(self):
    validation.in_range("mix", self.mix, 0, 1)
    if self.score != "softmax" or self.order != "softmax_topk":
      raise ValueError(f"score must be 'softmax' and order 'softmax_topk' for router "
                       f"{self.router_name!r} (it selects from mixed probabilities), got "
                       f"score={self.score!r}, order={self.order!r}")
    super().__post_init__()

  def mix_probs(self, probs: Array, x: Array, ctx: RoutingContext, batch: int) -> Array:
    return mix_over_graph(probs, self.graph(x, ctx, batch), self.mix)


@register("similarity")
class SimilarityRouter(GraphRouter):
  """Similarity-aware routing: S from the router inputs' dot products.

  Attributes:
    temperature: tau; None: sqrt(D).
    mix: a, the share of the graph-mixed distribution.
  """

  temperature: Optional[float] = None

  def __post_init__(self):
    if self.temperature is not None:
      validation.in_range("temperature", self.temperature, 0, math.inf, low_open=True)
    super().__post_init__()

  def graph(self, x: Array, ctx: RoutingContext, batch: int) -> Array:
    length = x.shape[0] // batch
    tau = math.sqrt(x.shape[-1]) if self.temperature is None else self.temperature
    return similarity_graph(x.reshape(batch, length, -1), token_graph_mask(ctx, batch, length),
                            tau)


@register("attention_aware")
class AttentionAwareRouter(GraphRouter):
  """Attention-aware routing: S is the preceding attention block's head-averaged
  probabilities (RoutingContext.attention), read without gradient.

  Attributes:
    mix: a, the share of the graph-mixed distribution.
  """

  context_fields: ClassVar[frozenset] = TopKRouter.context_fields | {"attention"}

  def graph(self, x: Array, ctx: RoutingContext, batch: int) -> Array:
    length = x.shape[0] // batch
    if ctx.attention is None:
      raise ValueError(
          "router 'attention_aware' reads the attention probabilities of an attention "
          "block before the MoE layer (RoutingContext.attention), and none were given: "
          "use it in moejax.models.TransformerLM, or pass ctx.attention [B, L, L]")
    if ctx.attention.shape != (batch, length, length):
      raise ValueError(f"RoutingContext.attention must be [B, L, L] = "
                       f"{(batch, length, length)}, got {ctx.attention.shape}")
    return jax.lax.stop_gradient(ctx.attention.astype(jnp.float32))
