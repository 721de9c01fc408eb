"""Stacked expert FFNs.

Every expert is the same FFN with its own weights, stacked on a leading E axis:

  mlp  y = act(x W_i) W_o                          W_i [E, D, F], W_o [E, F, D]
  glu  y = (act(x W_gate) * (x W_up)) W_o          (SwiGLU with act = silu;
                                                    Shazeer 2020, "GLU Variants")

The FFN is written once, against a `matmul(h, w)` supplied by the engine, so the
same math runs per expert (loop), batched over [E, C, D] (einsum) or grouped over
sorted rows (sorted). No biases, as in Mixtral and DeepSeek-MoE.

Granularity and shared experts (DeepSeekMoE, Dai et al. 2024) are set on the layer:
m-fold fine-grained experts turn (E, K, F) into (mE, mK, F/m); K_s shared experts
form one always-on FFN of hidden width K_s * F/m.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from moejax import validation

Array = jax.Array
Matmul = Callable[[Array, Array], Array]

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
EXPERT_TYPES = ("glu", "mlp")


class ExpertFFN(flax.struct.PyTreeNode):
  """Expert weights and the FFN that applies them with a given matmul.

  Attributes:
    weights: `wi` ([E, D, F]) or `wi_gate` and `wi_up`, and `wo` ([E, F, D]).
      Without the leading E axis for shared (dense) experts.
    activation: name in ACTIVATIONS.
    glu: gated (True) or plain (False) FFN.
  """

  weights: dict[str, Array]
  activation: str = flax.struct.field(pytree_node=False, default="silu")
  glu: bool = flax.struct.field(pytree_node=False, default=True)

  @property
  def num_experts(self) -> int:
    return self.weights["wo"].shape[0]

  def __call__(self, x: Array, matmul: Matmul,
               matmul_out: Optional[Matmul] = None) -> Array:
    """FFN of rows x, every product computed by matmul(h, w).

    `matmul_out`, if given, computes the output projection instead; engines use
    it to fuse the combine into the last product.
    """
    return (matmul_out or matmul)(self.hidden(x, matmul), self.weights["wo"])

  def hidden(self, x: Array, matmul: Matmul) -> Array:
    """The intermediate activation act(x W_i), or act(x W_gate) * (x W_up)."""
    act = ACTIVATIONS[self.activation]
    if self.glu:
      return act(matmul(x, self.weights["wi_gate"])) * matmul(x, self.weights["wi_up"])
    return act(matmul(x, self.weights["wi"]))


def dense_matmul(h: Array, w: Array) -> Array:
  """matmul for weights without an expert axis."""
  return jnp.dot(h, w)


class FFNWeights(nn.Module):
  """Creates FFN weights, stacked over `num_experts` unless it is None.

  Every parameter carries logical axes: ('expert', 'embed', 'mlp') for inputs and
  ('expert', 'mlp', 'embed') for the output projection (without 'expert' when
  unstacked).
  """

  hidden_dim: int
  num_experts: Optional[int] = None
  expert_type: str = "glu"
  activation: str = "silu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    validation.positive_int("hidden_dim", self.hidden_dim)
    if self.num_experts is not None:
      validation.positive_int("num_experts", self.num_experts)
    validation.one_of("expert_type", self.expert_type, EXPERT_TYPES)
    validation.one_of("activation", self.activation, tuple(ACTIVATIONS))
    super().__post_init__()

  @nn.compact
  def __call__(self, model_dim: int) -> ExpertFFN:
    stack = () if self.num_experts is None else (self.num_experts,)
    stack_axes = () if self.num_experts is None else ("expert",)
    batch_axis = () if self.num_experts is None else (0,)
    init = nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=batch_axis)

    def weight(name, shape, axes):
      w = self.param(name, nn.with_logical_partitioning(init, stack_axes + axes),
                     stack + shape, self.param_dtype)
      return jnp.asarray(w, self.dtype)

    d, f = model_dim, self.hidden_dim
    names = ("wi_gate", "wi_up") if self.expert_type == "glu" else ("wi",)
    weights = {n: weight(n, (d, f), ("embed", "mlp")) for n in names}
    weights["wo"] = weight("wo", (f, d), ("mlp", "embed"))
    return ExpertFFN(weights=weights, activation=self.activation,
                     glu=self.expert_type == "glu")
