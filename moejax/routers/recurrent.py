"""A router with memory across layers: a GRU over the layer index (RMoE).

"Layerwise Recurrent Router for Mixture-of-Experts" (Qiu et al. 2024). Each MoE
layer l projects its router input to R dimensions and updates a per-token GRU
state carried from the previous MoE layer; the logits come from that state:

  x'_l = x_l W_in,l                     W_in,l [D, R], per layer
  h_l  = GRU(x'_l, h_{l-1})             one cell for every layer (shared=True), h_0 = 0
  z_l  = h_l W_g,l                      W_g,l [R, E], per layer
  p_l  = softmax(z_l), top-K as the `topk` router (its options and losses)

GRU (flax.linen.GRUCell, the cell of the published code up to its two
redundant biases): r = sigma(W_ir x' + W_hr h + b_r), u = sigma(W_iu x' + W_hu h
+ b_u), n = tanh(W_in x' + b_n + r * (W_hn h + b_hn)), h' = (1 - u) n + u h.

Choices, from the published code (github.com/qiuzh20/RMoE, llama_moe_rnn): the
logits read h_l alone (no skip from x_l); R defaults to 256 there, here to
`hidden` (default 64: the tiny models' D is 128); gradients flow through the
carried state into earlier layers; the cell is shared across layers by default
(`shared=False` gives each layer its own). The state is per token, so the router
is causal.

The shared cell's parameters live in the first MoE layer's router (its
`gru`); they travel to the later layers with the state in the carry
(RecurrentCarry), so every layer applies the same weights and their gradient
sums over layers. The carry is recomputed on every forward pass: it is not
state, and a checkpoint holds only the parameters. All MoE layers of a model
must route over the same number of experts with the same `hidden` and
`shared`, or the carry is refused with an error naming the field.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from moejax import validation
from moejax.core import RoutingContext
from moejax.routers.base import DEFAULT_KERNEL_INIT
from moejax.routers.registry import register
from moejax.routers.topk import TopKRouter

Array = jax.Array


@flax.struct.dataclass
class RecurrentCarry:
  """What one MoE layer's recurrent router hands to the next.

  Attributes:
    state: float32[T, R], h_l per token.
    cell: the shared GRU cell's parameters (None when each layer has its own).
    num_experts, hidden, shared: the sender's settings, checked by the receiver.
  """

  state: Array
  cell: Optional[Any] = None
  num_experts: int = flax.struct.field(pytree_node=False, default=0)
  hidden: int = flax.struct.field(pytree_node=False, default=0)
  shared: bool = flax.struct.field(pytree_node=False, default=True)


@register("recurrent")
class RecurrentRouter(TopKRouter):
  """RMoE: top-K over the logits of a GRU state carried across MoE layers. See
  the module docstring; every `topk` setting applies to the logits.

  Attributes:
    hidden: R, the GRU's state and input width.
    shared: one GRU cell for all MoE layers (the paper's), else one per layer.
  """

  hidden: int = 64
  shared: bool = True

  has_expert_embeddings: ClassVar[bool] = False   # the gate reads h, not x
  context_fields: ClassVar[frozenset] = TopKRouter.context_fields | {"carry"}

  def __post_init__(self):
    validation.positive_int("hidden", self.hidden)
    super().__post_init__()

  def gate_logits(self, x: Array, ctx: RoutingContext) -> tuple[Array, RecurrentCarry]:
    num_tokens = x.shape[0]
    previous = ctx.carry
    if previous is None:
      state = jnp.zeros((num_tokens, self.hidden), jnp.float32)
    else:
      self._check_carry(previous, num_tokens)
      state = previous.state
    projected = nn.Dense(self.hidden, use_bias=False, dtype=jnp.float32,
                         param_dtype=jnp.float32, name="project",
                         kernel_init=nn.with_logical_partitioning(self.kernel_init,
                                                                  ("embed", None)))(x)
    cell_params = None
    if self.shared and previous is not None:
      cell_params = previous.cell
      state, _ = self._cell(parent=None).apply({"params": cell_params}, state, projected)
    else:
      cell = self._cell(name="gru")
      state, _ = cell(state, projected)
      if self.shared:
        cell_params = cell.variables["params"]
    logits = nn.Dense(self.num_experts, use_bias=False, dtype=jnp.float32,
                      param_dtype=jnp.float32, name="gate",
                      kernel_init=nn.with_logical_partitioning(DEFAULT_KERNEL_INIT,
                                                               (None, None)))(state)
    carry = RecurrentCarry(state=state, cell=cell_params, num_experts=self.num_experts,
                           hidden=self.hidden, shared=self.shared)
    return logits, carry

  @nn.nowrap
  def _cell(self, **module_kwargs) -> nn.GRUCell:
    """flax's GRU cell of width R; its parameters replicated (logical axes None)."""
    replicated = lambda init: nn.with_logical_partitioning(init, (None, None))
    return nn.GRUCell(self.hidden, param_dtype=jnp.float32,
                      kernel_init=replicated(nn.initializers.lecun_normal()),
                      recurrent_kernel_init=replicated(nn.initializers.orthogonal()),
                      **module_kwargs)

  def _check_carry(self, carry: Any, num_tokens: int) -> None:
    if not isinstance(carry, RecurrentCarry):
      raise ValueError(f"router 'recurrent' received a carry of type {type(carry).__name__}"
                       " from the previous MoE layer; every MoE layer of the model must use "
                       "the recurrent router")
    for field, mine in (("num_experts", self.num_experts), ("hidden", self.hidden),
                        ("shared", self.shared)):
      theirs = getattr(carry, field)
      if theirs != mine:
        raise ValueError(
            f"{field}: the recurrent router's carry comes from a MoE layer with {field} "
            f"{theirs}, this layer has {mine}; every MoE layer of a model with a recurrent "
            f"router needs the same {field}")
    if carry.state.shape[0] != num_tokens:
      raise ValueError(f"the recurrent router's carry holds {carry.state.shape[0]} tokens, "
                       f"this layer routes {num_tokens}")
