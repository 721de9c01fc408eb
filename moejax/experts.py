"""Stacked expert FFNs.

Every expert is the same FFN with its own weights, stacked on a leading E axis:

  mlp  y = act(x W_i) W_o                          W_i [E, D, F], W_o [E, F, D]
  glu  y = (act(x W_gate) * (x W_up)) W_o          (SwiGLU with act = silu;
                                                    Shazeer 2020, "GLU Variants")

The FFN is written once, against a `matmul(h, w)` supplied by the engine, so the
same math runs per expert (loop), batched over [E, C, D] (einsum) or grouped over
sorted rows (sorted). No biases by default, as in Mixtral and DeepSeek-MoE; with
`use_bias` each product gains its expert's bias b [E, N], computed by the same
matmul as 1 [rows, 1] @ b [E, 1, N], so every engine and expert parallelism add
the bias of each row's own expert. Hidden dropout (`ExpertFFN.dropout_rate` with
a `dropout_key`) drops entries of act(.) in training.

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
  dropout_rate: float = flax.struct.field(pytree_node=False, default=0.0)
  dropout_key: Optional[Array] = None

  @property
  def num_experts(self) -> int:
    return self.weights["wo"].shape[0]

  def __call__(self, x: Array, matmul: Matmul,
               matmul_out: Optional[Matmul] = None) -> Array:
    """FFN of rows x, every product computed by matmul(h, w).

    `matmul_out`, if given, computes the output projection instead; engines use
    it to fuse the combine into the last product.
    """
    return self._product(self.hidden(x, matmul), "wo", matmul_out or matmul)

  def hidden(self, x: Array, matmul: Matmul) -> Array:
    """The intermediate activation act(x W_i), or act(x W_gate) * (x W_up), each
    product with its bias if any; dropped out where a dropout key is set."""
    act = ACTIVATIONS[self.activation]
    if self.glu:
      h = act(self._product(x, "wi_gate", matmul)) * self._product(x, "wi_up", matmul)
    else:
      h = act(self._product(x, "wi", matmul))
    if self.dropout_key is not None and self.dropout_rate > 0:
      keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout_rate, h.shape)
      h = jnp.where(keep, h / (1.0 - self.dropout_rate), 0).astype(h.dtype)
    return h

  def _product(self, x: Array, name: str, matmul: Matmul) -> Array:
    """x W_name (+ b_name of each row's expert)."""
    y = matmul(x, self.weights[name])
    bias = self.weights.get(bias_name(name))
    if bias is not None:
      y = y + matmul(jnp.ones(x.shape[:-1] + (1,), x.dtype), bias[..., None, :])
    return y


def bias_name(weight: str) -> str:
  """The name of weight `weight`'s bias: b_wi, b_wo, ..."""
  return f"b_{weight}"


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
  kernel_init: Optional[Callable[..., Array]] = None
  use_bias: bool = False
  bias_init: Callable[..., Array] = nn.initializers.zeros

  def __post_init__(self):
    validation.positive_int("hidden_dim", self.hidden_dim)
    if self.num_experts is not None:
      validation.positive_int("num_experts", self.num_experts)
    validation.one_of("expert_type", self.expert_type, EXPERT_TYPES)
    validation.one_of("activation", self.activation, tuple(ACTIVATIONS))
    super().__post_init__()

  @nn.compact
  def __call__(self, model_dim: int, dtype: Optional[Any] = None) -> ExpertFFN:
    """The weights for inputs of width model_dim, cast to `dtype` (default: the
    field's)."""
    dtype = self.dtype if dtype is None else dtype
    stack = () if self.num_experts is None else (self.num_experts,)
    stack_axes = () if self.num_experts is None else ("expert",)
    if self.kernel_init is None:
      batch_axis = () if self.num_experts is None else (0,)
      init = nn.initializers.variance_scaling(
          1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=batch_axis)
    else:
      init = self.kernel_init if self.num_experts is None else per_expert(self.kernel_init)
    bias_init = self.bias_init if self.num_experts is None else per_expert(self.bias_init)

    def param(name, shape, axes, initializer):
      w = self.param(name, nn.with_logical_partitioning(initializer, stack_axes + axes),
                     stack + shape, self.param_dtype)
      return jnp.asarray(w, dtype)

    d, f = model_dim, self.hidden_dim
    names = ("wi_gate", "wi_up") if self.expert_type == "glu" else ("wi",)
    weights = {n: param(n, (d, f), ("embed", "mlp"), init) for n in names}
    weights["wo"] = param("wo", (f, d), ("mlp", "embed"), init)
    if self.use_bias:
      for n in names:
        weights[bias_name(n)] = param(bias_name(n), (f,), ("mlp",), bias_init)
      weights[bias_name("wo")] = param(bias_name("wo"), (d,), ("embed",), bias_init)
    return ExpertFFN(weights=weights, activation=self.activation,
                     glu=self.expert_type == "glu")


def per_expert(init: Callable[..., Array]) -> Callable[..., Array]:
  """An initializer of one expert's array, applied to each slice of a stack [E, ...]
  with its own key (so fan-in and fan-out are those of one expert)."""
  def stacked(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, shape[0])
    return jax.vmap(lambda k: init(k, tuple(shape[1:]), dtype))(keys)
  return stacked
