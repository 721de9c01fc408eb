"""Decoder-only transformer language model with MoE feed-forward layers.

  tokens [B, L] -> embed -> N x Block -> RMSNorm -> logits [B, L, V]   (float32)
  Block: x + Attention(RMSNorm(x)), then x + FFN(RMSNorm(x))   (pre-norm)

FFN is the moejax `MoE` layer in every `moe_every`-th block (blocks moe_every-1,
2*moe_every-1, ...) and a dense FFN of width `mlp_dim` elsewhere. Each MoE layer
gets a RoutingContext with the layer index, positions, segment ids, token ids,
the step, causal=True and, when its router asks for it (`needs_attention`), the
head-averaged attention probabilities of its block. Activations may be bfloat16;
routers always compute in float32.

The model returns the logits and {"layer_<i>": MoEAux} for its MoE layers; each
aux.loss is already weighted by the layer's loss_weights.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from moejax import routers, validation
from moejax.core import RoutingContext, layer_key
from moejax.experts import FFNWeights, dense_matmul
from moejax.layer import MoE, MoEAux
from moejax.models.attention import CausalSelfAttention

Array = jax.Array


def rms_norm(name: str, dtype: Any, param_dtype: Any) -> nn.RMSNorm:
  return nn.RMSNorm(name=name, dtype=dtype, param_dtype=param_dtype,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)))


class DenseFFN(nn.Module):
  """The dense FFN of the non-MoE blocks (and of dense baselines)."""

  hidden_dim: int
  expert_type: str = "glu"
  activation: str = "silu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    ffn = FFNWeights(self.hidden_dim, None, self.expert_type, self.activation, self.dtype,
                     self.param_dtype, name="ffn")(x.shape[-1])
    return ffn(x.reshape(-1, x.shape[-1]), dense_matmul).reshape(x.shape)


class Block(nn.Module):
  """One pre-norm transformer block; `moe` holds MoE settings or is None (dense)."""

  layer: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  moe: Optional[Mapping[str, Any]] = None
  expert_type: str = "glu"
  activation: str = "silu"
  rope_base: float = 10000.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.attention_norm = rms_norm("attention_norm", self.dtype, self.param_dtype)
    self.attention = CausalSelfAttention(self.num_heads, self.head_dim, self.rope_base,
                                         self.dtype, self.param_dtype)
    self.ffn_norm = rms_norm("ffn_norm", self.dtype, self.param_dtype)
    if self.moe is None:
      self.ffn = DenseFFN(self.mlp_dim, self.expert_type, self.activation, self.dtype,
                          self.param_dtype)
    else:
      self.moe_layer = MoE(**self.moe, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="moe")

  def __call__(self, x: Array, ctx: RoutingContext, deterministic: bool
               ) -> tuple[Array, Optional[MoEAux]]:
    wants_attention = self.moe is not None and getattr(
        routers.get(self.moe.get("router", "topk")), "needs_attention", False)
    h, probs = self.attention(self.attention_norm(x), ctx.positions, ctx.segment_ids,
                              return_probs=wants_attention)
    x = x + h
    h = self.ffn_norm(x)
    if self.moe is None:
      return x + self.ffn(h), None
    ctx = ctx.replace(layer=self.layer, attention=probs)
    y, aux = self.moe_layer(h, ctx, deterministic=deterministic)
    return x + y, aux

  def update_routing(self) -> None:
    if self.moe is not None:
      self.moe_layer.update_routing()


class TransformerLM(nn.Module):
  """Decoder-only LM. See the module docstring.

  Attributes:
    vocab_size: V.
    num_layers: number of blocks.
    model_dim: D.
    num_heads: H.
    head_dim: Dh; defaults to D / H.
    mlp_dim: hidden width of the dense FFN blocks.
    moe: MoE settings (keyword arguments of moejax.MoE); None for a dense model.
    moe_every: every moe_every-th block is an MoE block.
    expert_type, activation: dense FFN type (`glu`/`mlp`) and activation.
    tie_embeddings: logits from the embedding matrix (else a separate head).
    rope_base: RoPE wavelength base.
    dtype: activation dtype (e.g. bfloat16); logits and routers are float32.
    param_dtype: parameter dtype.
  """

  vocab_size: int
  num_layers: int = 2
  model_dim: int = 128
  num_heads: int = 4
  head_dim: Optional[int] = None
  mlp_dim: int = 512
  moe: Optional[Mapping[str, Any]] = None
  moe_every: int = 1
  expert_type: str = "glu"
  activation: str = "silu"
  tie_embeddings: bool = True
  rope_base: float = 10000.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    for field in ("vocab_size", "num_layers", "model_dim", "num_heads", "mlp_dim",
                  "moe_every"):
      validation.positive_int(f"model.{field}", getattr(self, field))
    if self.head_dim is None and self.model_dim % self.num_heads:
      raise ValueError(f"model.num_heads ({self.num_heads}) must divide model.model_dim "
                       f"({self.model_dim}) unless model.head_dim is set")
    if self.resolved_head_dim % 2:
      raise ValueError(f"model.head_dim must be even for RoPE, got {self.resolved_head_dim}")
    if self.moe is not None:
      routers.check_causal(self._router_template())  # validates the MoE; the model is causal
    super().__post_init__()

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.model_dim // self.num_heads

  def is_moe_layer(self, layer: int) -> bool:
    return self.moe is not None and (layer + 1) % self.moe_every == 0

  @property
  def uses_global_balance(self) -> bool:
    """Whether a router balances over the whole step (needs RoutingContext.global_counts)."""
    if self.moe is None:
      return False
    weights = MoE(**self.moe, parent=None).resolved_loss_weights
    return (getattr(self._router_template(), "balance_scope", None) == "global"
            and weights.get("switch", 0.0) > 0)

  @property
  def consistency_weight(self) -> float:
    """Weight of THOR's consistency loss between two forward passes: the router's
    `consistency_weight` (random routing), else 0."""
    if self.moe is None:
      return 0.0
    return float(getattr(self._router_template(), "consistency_weight", 0.0))

  def _router_template(self) -> nn.Module:
    """The MoE layers' router, unbound (validates the MoE settings)."""
    return MoE(**self.moe, model_dim=None, parent=None).make_router(parent=None)

  def setup(self):
    self.embed = nn.Embed(self.vocab_size, self.model_dim, dtype=self.dtype,
                          param_dtype=self.param_dtype,
                          embedding_init=nn.with_logical_partitioning(
                              nn.initializers.normal(self.model_dim ** -0.5),
                              ("vocab", "embed")))
    moe = None if self.moe is None else FrozenDict(self.moe)
    self.blocks = [
        Block(layer, self.num_heads, self.resolved_head_dim, self.mlp_dim,
              moe if self.is_moe_layer(layer) else None, self.expert_type, self.activation,
              self.rope_base, self.dtype, self.param_dtype, name=f"block_{layer}")
        for layer in range(self.num_layers)]
    self.final_norm = rms_norm("final_norm", self.dtype, self.param_dtype)
    if not self.tie_embeddings:
      self.head = nn.Dense(self.vocab_size, use_bias=False, dtype=jnp.float32,
                           param_dtype=self.param_dtype,
                           kernel_init=nn.with_logical_partitioning(
                               nn.initializers.variance_scaling(1.0, "fan_in",
                                                                "truncated_normal"),
                               ("embed", "vocab")))

  def __call__(self, tokens: Array, positions: Optional[Array] = None,
               segment_ids: Optional[Array] = None, *, deterministic: bool = True,
               step: Optional[Array] = None, global_counts: Optional[Mapping] = None,
               data_shards: int = 1) -> tuple[Array, dict[str, MoEAux]]:
    """tokens int[B, L] -> (logits float32[B, L, V], {"layer_<i>": MoEAux}).

    `global_counts` and `data_shards` go to the routers' RoutingContext (balance
    scopes `global` and `microbatch`).
    """
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = self.embed(tokens)
    ctx = RoutingContext(positions=positions, segment_ids=segment_ids, step=step,
                         token_ids=tokens, global_counts=global_counts, causal=True,
                         data_shards=data_shards)
    aux = {}
    for layer, block in enumerate(self.blocks):
      x, layer_aux = block(x, ctx, deterministic)
      if layer_aux is not None:
        aux[layer_key(layer)] = layer_aux
    x = self.final_norm(x)
    if self.tie_embeddings:
      logits = x.astype(jnp.float32) @ jnp.asarray(self.embed.embedding, jnp.float32).T
    else:
      logits = self.head(x)
    return logits.astype(jnp.float32), aux

  def update_routing(self) -> None:
    """After an optimizer step: every router updates its `routing` state
    (apply with method=TransformerLM.update_routing, mutable=['routing'])."""
    for block in self.blocks:
      block.update_routing()
