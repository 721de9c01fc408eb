"""Decoder-only transformer language model with MoE feed-forward layers.

  tokens [B, L] -> embed -> N x Block -> RMSNorm -> logits [B, L, V]   (float32)
  Block: x + Attention(RMSNorm(x)), then x + FFN(RMSNorm(x))   (pre-norm)

FFN is the moejax `MoE` layer in every `moe_every`-th block (blocks moe_every-1,
2*moe_every-1, ...) and a dense FFN of width `mlp_dim` elsewhere; `moe` is an MoE
module (a template each MoE block clones, with the model's dtypes) or its
keyword arguments. Each MoE layer's router receives a RoutingContext with the
fields it declares (routers/base.py, context_fields) among the positions, token
ids, the step, this layer's step counts (`global_counts`), the carry its router
handed on at the previous MoE layer (None at the first; dense blocks pass it
through), and the head-averaged attention probabilities of its block, computed
only for a router that declares them; every router gets the segment ids, the
layer index, the model's causality and the data shards. Activations may be bfloat16;
routers always compute in float32.

With `expert_reuse` r > 1 (ReXMoE, routers/rexmoe.py) the MoE layers form groups
of r adjacent ones; each group shares one pool of r * mE experts (`expert_pool_<g>`,
the parameters of the group's r layers' experts), which every layer of the group
routes over (MoE.expert_pool).

The model returns the logits and {"layer_<i>": MoEAux} for its MoE layers; each
aux.loss is already weighted by the layer's loss_weights.

With decode=True (cached decoding, moejax.models.generate) every attention keeps
its keys and values in the collection `cache` (models/attention.py) and every MoE
layer routes with decode=True: no capacity, and a router that reads the earlier
tokens of its sequence (reads_earlier_tokens) is refused. The caller passes the
positions of the new tokens (cache index + arange(L)); the model does not track the
index.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

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
  """One pre-norm transformer block; `moe` is the MoE template, or None (dense);
  `expert_pool`, `pool_layers`, `pool_position`: the MoE layer's shared pool."""

  layer: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  moe: Optional[MoE] = None
  expert_type: str = "glu"
  activation: str = "silu"
  rope_base: float = 10000.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = True
  expert_pool: Optional[nn.Module] = None
  pool_layers: int = 1
  pool_position: int = 0

  def setup(self):
    self.attention_norm = rms_norm("attention_norm", self.dtype, self.param_dtype)
    self.attention = CausalSelfAttention(self.num_heads, self.head_dim, self.rope_base,
                                         self.dtype, self.param_dtype, self.causal)
    self.ffn_norm = rms_norm("ffn_norm", self.dtype, self.param_dtype)
    if self.moe is None:
      self.ffn = DenseFFN(self.mlp_dim, self.expert_type, self.activation, self.dtype,
                          self.param_dtype)
    else:
      self.moe_layer = self.moe.clone(parent=self, name="moe", dtype=self.dtype,
                                      param_dtype=self.param_dtype,
                                      expert_pool=self.expert_pool,
                                      pool_layers=self.pool_layers,
                                      pool_position=self.pool_position)

  def __call__(self, x: Array, ctx: RoutingContext, deterministic: bool,
               decode: bool = False) -> tuple[Array, Optional[MoEAux]]:
    """x [B, L, D] -> (x [B, L, D], the MoE layer's aux or None). `ctx` holds every
    field the model offers; the router receives those it declares. `decode`: cached
    attention and MoE decode routing; without it the MoE layer's own `decode`
    setting applies."""
    reads = frozenset() if self.moe is None else self.moe.router_spec.context_fields
    h, probs = self.attention(self.attention_norm(x), ctx.positions, ctx.segment_ids,
                              return_probs="attention" in reads, decode=decode)
    x = x + h
    h = self.ffn_norm(x)
    if self.moe is None:
      return x + self.ffn(h), None
    ctx = ctx.replace(layer=self.layer, attention=probs).restricted(reads)
    y, aux = self.moe_layer(h, ctx, deterministic=deterministic, decode=decode or None)
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
    moe: the MoE layer, a moejax.MoE template (unbound, parent=None) or its keyword
      arguments; None for a dense model.
    moe_every: every moe_every-th block is an MoE block.
    expert_type, activation: dense FFN type (`glu`/`mlp`) and activation.
    tie_embeddings: logits from the embedding matrix (else a separate head).
    rope_base: RoPE wavelength base.
    dtype: activation dtype (e.g. bfloat16); logits and routers are float32.
    param_dtype: parameter dtype.
    causal: True (a decoder LM, default); False for a bidirectional encoder (e.g.
      a masked-diffusion LM), where routers that look at other tokens of the
      sequence (expert choice) are legitimate.
    expert_reuse: r, adjacent MoE layers sharing one expert pool (1: none).
  """

  vocab_size: int
  num_layers: int = 2
  model_dim: int = 128
  num_heads: int = 4
  head_dim: Optional[int] = None
  mlp_dim: int = 512
  moe: Optional[Union[MoE, Mapping[str, Any]]] = None
  moe_every: int = 1
  expert_type: str = "glu"
  activation: str = "silu"
  tie_embeddings: bool = True
  rope_base: float = 10000.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = True
  expert_reuse: int = 1

  def __post_init__(self):
    for field in ("vocab_size", "num_layers", "model_dim", "num_heads", "mlp_dim",
                  "moe_every"):
      validation.positive_int(f"model.{field}", getattr(self, field))
    if self.head_dim is None and self.model_dim % self.num_heads:
      raise ValueError(f"model.num_heads ({self.num_heads}) must divide model.model_dim "
                       f"({self.model_dim}) unless model.head_dim is set")
    if self.resolved_head_dim % 2:
      raise ValueError(f"model.head_dim must be even for RoPE, got {self.resolved_head_dim}")
    if self.moe is not None and not isinstance(self.moe, MoE):
      object.__setattr__(self, "moe", MoE(**self.moe, parent=None))
    if self.moe is not None and self.causal:
      routers.check_causal(self.moe.router_spec)
    validation.positive_int("model.expert_reuse", self.expert_reuse)
    if self.expert_reuse > 1:
      if self.moe is None:
        raise ValueError(f"model.expert_reuse ({self.expert_reuse}) needs MoE layers")
      if self.num_moe_layers % self.expert_reuse:
        raise ValueError(f"model.expert_reuse ({self.expert_reuse}) must divide the number "
                         f"of MoE layers ({self.num_moe_layers})")
    super().__post_init__()

  @property
  def routable_experts(self) -> int:
    """The experts each MoE layer's router chooses among: mE, or the pool's
    mE * expert_reuse."""
    return self.moe.routed_experts * self.expert_reuse

  @property
  def num_moe_layers(self) -> int:
    return sum(self.is_moe_layer(layer) for layer in range(self.num_layers))

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.model_dim // self.num_heads

  def is_moe_layer(self, layer: int) -> bool:
    return self.moe is not None and (layer + 1) % self.moe_every == 0

  @property
  def step_needs(self) -> routers.StepNeeds:
    """What the training step must do for the model's routers (MoE.step_needs)."""
    return routers.StepNeeds() if self.moe is None else self.moe.step_needs

  def setup(self):
    self.embed = nn.Embed(self.vocab_size, self.model_dim, dtype=self.dtype,
                          param_dtype=self.param_dtype,
                          embedding_init=nn.with_logical_partitioning(
                              nn.initializers.normal(self.model_dim ** -0.5),
                              ("vocab", "embed")))
    pools = []
    if self.expert_reuse > 1:
      pools = [self.moe.make_experts(self.moe.routed_experts * self.expert_reuse,
                                     param_dtype=self.param_dtype, name=f"expert_pool_{g}")
               for g in range(self.num_moe_layers // self.expert_reuse)]
    self.expert_pools = pools
    blocks, moe_index = [], 0
    for layer in range(self.num_layers):
      moe, pool = None, {}
      if self.is_moe_layer(layer):
        moe = self.moe
        if pools:
          pool = dict(expert_pool=pools[moe_index // self.expert_reuse],
                      pool_layers=self.expert_reuse,
                      pool_position=moe_index % self.expert_reuse)
        moe_index += 1
      blocks.append(Block(layer, self.num_heads, self.resolved_head_dim, self.mlp_dim, moe,
                          self.expert_type, self.activation, self.rope_base, self.dtype,
                          self.param_dtype, self.causal, **pool, name=f"block_{layer}"))
    self.blocks = blocks
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
               data_shards: int = 1, capacity: Optional[Any] = None, decode: bool = False
               ) -> tuple[Array, dict[str, MoEAux]]:
    """tokens int[B, L] -> (logits float32[B, L, V], {"layer_<i>": MoEAux}).

    `global_counts` ({"layer_<i>": float32[E]}, the step's counts of each MoE
    layer) and `data_shards` go to the routers' RoutingContext (balance scopes
    `global` and `microbatch`); `capacity` (a per-expert capacity for every MoE
    layer, or {"layer_<i>": capacity}; static or traced) to routers that read
    RoutingContext.capacity (expert choice: a capacity schedule set from outside).
    `decode`: cached decoding (see the module docstring); it needs `positions`
    int[B, L], those of the new tokens, and takes no segment_ids.
    """
    if positions is None:
      if decode:
        raise ValueError("decode=True needs positions int[B, L] of the new tokens (cache "
                         "index + arange(L)); the model does not track the cache index")
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = self.embed(tokens)
    ctx = RoutingContext(positions=positions, segment_ids=segment_ids, step=step,
                         token_ids=tokens, causal=self.causal, data_shards=data_shards)
    aux, carry = {}, None
    for layer, block in enumerate(self.blocks):
      counts = None if global_counts is None else global_counts.get(layer_key(layer))
      cap = capacity.get(layer_key(layer)) if isinstance(capacity, Mapping) else capacity
      x, layer_aux = block(x, ctx.replace(carry=carry, global_counts=counts, capacity=cap),
                           deterministic, decode)
      if layer_aux is not None:
        aux[layer_key(layer)] = layer_aux
        carry = layer_aux.carry
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
